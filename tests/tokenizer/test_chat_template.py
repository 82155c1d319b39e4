"""Chat templates are untrusted (issue 16 #5): time and output-size limits, a clear error, same output as jinja."""

from __future__ import annotations

import resource
import time

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from frugallm.errors import TemplateError
from frugallm.tokenizer.chat_template import CHATML_TEMPLATE, RenderLimits, render_chat

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
S = "{% set s = 'a' * 4000000 %}"  # under the budget; what the templates below grow from


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 4000000000 }}",  # constant-folded at compile time by plain jinja: 4 GB before rendering
        "{{ 'a'|center(4000000000) }}",
        "{{ 'a'.center(4000000000) }}",
        "{{ 'a'.ljust(4000000000) }}",
        "{{ '{:>4000000000}'.format('a') }}",
        "{{ '%4000000000s' % 'a' }}",
        "{{ '%*s'|format(4000000000, 'a') }}",
        "{{ 'a\nb'|indent(4000000000) }}",
        "{{ [1]|batch(4000000000, 'x')|list }}",
        "{{ [1]|slice(4000000000)|list }}",
        "{{ 10 ** 4000000000 }}",
        S + "{{ [s] * 100000 }}",  # a list of references, its text 400 GB
        S + "{{ ([s] * 100000)|join }}",
        S + "{{ ([s] * 100000)|string }}",
        S + "{{ ([s] * 100000) ~ '' }}",
        S + "{{ s.join(range(1000)|map('string')) }}",
        S + "{{ s|replace('a', s) }}",
        S + "{{ s + s }}",
        "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
        S + "{% for i in range(100) %}{{ s }}{% endfor %}",  # each piece fits, the whole does not
    ],
)
def test_size_limit_is_checked_before_allocating(template: str) -> None:
    before = peak_rss_mb()
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="output limit"):
        render_chat(template, MSGS)
    assert time.perf_counter() - t0 < 1.5
    assert peak_rss_mb() - before < 200  # the budget is 4 Mi characters: no gigabyte was ever allocated


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{{ '' }}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{{ range(100000)|map('string')|list|length }}{% endfor %}",
        "{% macro f(n) %}{% for i in range(100000) %}{{ caller() if n else '' }}{% endfor %}{% endmacro %}"
        "{% call f(1) %}{% for j in range(100000) %}{% endfor %}{% endcall %}",
    ],
)
def test_time_limit(template: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match=r"time limit \(0.3 s\)"):
        render_chat(template, MSGS, limits=RenderLimits(max_seconds=0.3))
    assert time.perf_counter() - t0 < 2.0


def test_default_limits_stop_issue_examples_quickly() -> None:
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="time limit"):
        render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", MSGS)
    with pytest.raises(TemplateError, match="output limit"):
        render_chat("{{ 'a' * 4000000000 }}", MSGS)
    assert time.perf_counter() - t0 < RenderLimits().max_seconds + 2


# Realistic templates: filters, loops, macros, '~', format, tojson, namespaces; the limited sandbox must render
# exactly what jinja's immutable sandbox renders.
QWEN_LIKE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(n=0) %}"
    "{%- for message in messages %}{%- set ns.n = ns.n + 1 %}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content | trim ~ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    "{{- '%d messages, %s' | format(ns.n, 'done') }}{{ '{}/{}'.format(ns.n, messages|length) }}"
    "{{ (messages | map(attribute='role') | join(', ')) | upper | center(40) }}"
    "{{ 'x' * 3 + 'y' }}{{ [1, 2] * 2 }}{{ 2 ** 10 }}{{ 'a-b'.replace('-', '+') }}{{ 'ab'.join(['1', '2']) }}"
    "{% for b in messages|batch(1) %}{{ loop.index }}{% endfor %}{{ 'a\\nb' | indent(2) }}"
)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN_LIKE])
def test_same_output_as_jinja_sandbox(template: str) -> None:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = render_chat.__globals__["_compile"](template).environment.filters["tojson"]
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    ref = env.from_string(template).render(messages=MSGS, add_generation_prompt=True, bos_token="", eos_token="",
                                           tools=tools)
    assert render_chat(template, MSGS, tools=tools) == ref


def test_long_prompt_is_not_refused() -> None:
    """The budget grows with the messages: a prompt longer than max_output_chars renders, repeated twice."""
    big = "word " * 1_000_000  # 5 M characters
    template = "{{ messages[0].content }}{% for m in messages %}{{ m.content }}{% endfor %}"
    out = render_chat(template, [{"role": "user", "content": big}], limits=RenderLimits(max_output_chars=1000))
    assert out == big + big


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        RenderLimits(max_output_chars=0)
    with pytest.raises(ValueError):
        RenderLimits(max_seconds=0)
