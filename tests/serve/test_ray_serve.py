"""Ray Serve scale-out on a local Ray cluster: the ``openai`` client through Ray's HTTP proxy (completions and chat,
streamed and not) against 2 engine replicas, adapter and prefix routing, ``/health`` and ``/metrics`` per replica,
and a replica killed under a request (that request gets an error, Ray replaces the replica, later requests work).

One cluster for the module (Ray's start-up is most of the cost): 2 CPUs, no dashboard, the tiny llama model.
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve tests need the 'ray' extra: pip install 'frugallm[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve tests need the 'ray' extra: pip install 'frugallm[ray]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from ray import serve  # noqa: E402

from frugallm import LLM, SamplingParams  # noqa: E402
from frugallm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from frugallm.serve.ray_app import ENGINE, RayServeOptions, build_app, engine_builder  # noqa: E402
from frugallm.serve.relay import REPLICA_HEADER  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "lora"))
from peft_adapters import VARIANTS, make_adapter  # noqa: E402

KEY = "ray-key"
MAX_BODY = 64 * 1024
APP = "frugallm"
STEP_DELAY_S = 0.01  # each engine step sleeps this long: a 200-token request is in flight for seconds


def slow_engine(build: Any, delay: float) -> LLMEngine:
    """The replicas' engine, each step slowed down so that a replica can be killed under a running request."""
    engine = build()
    step = engine.step

    def slow_step(*a: Any, **kw: Any) -> Any:
        time.sleep(delay)
        return step(*a, **kw)

    engine.step = slow_step
    return engine


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory) -> Any:
    import functools

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    model = tiny_models.hf("llama")
    adapter = make_adapter(tiny_models.hf_reference("llama"), tmp_path_factory.mktemp("ray_lora") / "sql", seed=31,
                           **VARIANTS["lora"])
    llm_kwargs = dict(dtype="float32", device="cpu", threads=1, lora={"sql": str(adapter)}, max_loras=2,
                      max_lora_rank=4)
    config = EngineConfig(num_blocks=256, block_size=4, max_num_seqs=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = proxy_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        build = functools.partial(slow_engine, engine_builder(str(model), config, **llm_kwargs), STEP_DELAY_S)
        options = RayServeOptions("tiny", replicas=2, api_key=KEY, replica_cpus=0.5, max_body_bytes=MAX_BODY)
        serve.run(build_app(build, options), name=APP, route_prefix="/")
        llm = LLM(str(model), **llm_kwargs)
        yield {"url": f"http://127.0.0.1:{port}", "llm": llm}
    finally:
        serve.shutdown()
        ray.shutdown()


def proxy_port() -> int:
    """A free port for Serve's proxy from 20000-32767: above Ray's worker ports (10002-19999) and below the kernel's
    ephemeral range, where Ray's own processes take ports. A port picked by binding port 0 comes from that range
    and can be taken again before the proxy binds it (CI saw "Failed to bind to address")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: the IANA ephemeral range starts at 49152
        low = 32768
    for port in random.Random().sample(range(20000, min(low, 32768)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def client(cluster: Any) -> Any:
    return openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(llm: LLM, prompt: Any, n: int, lora: str | None = None) -> str:
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), lora=lora)[0].text


def replica_of(raw: Any) -> str:
    return raw.headers[REPLICA_HEADER]


def test_openai_client_through_the_ray_proxy(cluster) -> None:
    c, llm = client(cluster), cluster["llm"]
    assert [m.id for m in c.models.list().data] == ["tiny", "sql"]
    kw = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    assert c.completions.create(**kw).choices[0].text == greedy(llm, "the cat sat", 8)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == greedy(llm, "the cat sat", 8)
    assert chunks[-1].usage.completion_tokens == 8
    chat = [{"role": "user", "content": "Say hi"}]
    ref = greedy(llm, llm.chat_prompt(chat), 6)
    r = c.chat.completions.create(model="tiny", messages=chat, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=chat, max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if ch.choices]
    assert "".join(parts) == ref
    # Bad input is the plain server's answer, through the proxy: 400 naming the field, 404 an unknown model, 401.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="wrong", max_retries=0).models.list()
    big = b'{"model": "tiny", "prompt": "' + b"x" * MAX_BODY + b'"}'
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (big, iter([big[:1000], big[1000:]])):  # with Content-Length, and chunked without it
        r = httpx.post(f"{cluster['url']}/v1/completions", content=body, headers=auth)
        assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]["message"]


def test_adapters_and_prefixes_stay_on_one_replica(cluster) -> None:
    c, llm = client(cluster), cluster["llm"]
    prompt = [5, 17, 30, 9, 44, 12]

    def sql() -> tuple[str, str]:
        raw = c.completions.with_raw_response.create(model="sql", prompt=prompt, max_tokens=5, temperature=0,
                                                     extra_body={"ignore_eos": True})
        return replica_of(raw), raw.parse().choices[0].text

    first, text = sql()
    # The replica reports the adapters it holds to Ray's controller (every 0.1 s), which tells the ingress's router;
    # until then Ray routes by load.
    time.sleep(2.0)
    replicas, texts = zip(*(sql() for _ in range(4)), strict=True)
    assert set(texts) == {text} == {greedy(llm, prompt, 5, lora="sql")}
    assert set(replicas) == {first}, (first, replicas)
    # Prefix affinity: every request sharing a long prefix lands where the first one did; a new prefix goes to the
    # replica that has seen the least (the other one).
    seen = {}
    for head in ("alpha beta gamma delta epsilon zeta eta theta", "one two three four five six seven eight nine"):
        seen[head] = {replica_of(c.completions.with_raw_response.create(
            model="tiny", prompt=f"{head} {i}", max_tokens=2, temperature=0)) for i in range(3)}
    assert all(len(s) == 1 for s in seen.values()), seen
    assert len(set.union(*seen.values())) == 2, seen


def test_bench_endpoint_load_generator_through_ray(cluster) -> None:
    from frugallm.lab.endpoint import run_load

    results, wall = run_load(cluster["url"], ["one two", "three four five"], max_tokens=6, concurrency=3, requests=6,
                             api_key=KEY)
    assert [r.error for r in results] == [None] * 6 and all(r.output_tokens == 6 and r.ttft_s for r in results)
    denied, _ = run_load(cluster["url"], ["x"], max_tokens=2, concurrency=1, requests=1, model="tiny", api_key="")
    assert "HTTP 401" in denied[0].error


def test_adapters_loaded_over_http_reach_every_replica(cluster, tiny_models, tmp_path) -> None:
    url, auth = cluster["url"], {"Authorization": f"Bearer {KEY}"}
    path = make_adapter(tiny_models.hf_reference("llama"), tmp_path / "dora", seed=32, **VARIANTS["dora"])

    def model_ids() -> list[set[str]]:
        """``/v1/models`` of each replica (the router sends it to the less loaded of two: ask until both answered)."""
        seen: dict[str, set[str]] = {}
        for _ in range(30):
            r = httpx.get(f"{url}/v1/models", headers=auth)
            seen[r.headers[REPLICA_HEADER]] = {m["id"] for m in r.json()["data"]}
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        return list(seen.values())

    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(path)}, headers=auth)
    assert r.status_code == 200, r.text
    assert all(ids == {"tiny", "sql", "dora"} for ids in model_ids())
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)}, headers=auth)
    assert bad.status_code == 400 and str(tmp_path) in bad.json()["error"]["message"]
    c = client(cluster)
    text = c.completions.create(model="dora", prompt=[5, 17, 30], max_tokens=4, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    cluster["llm"].lora.add("dora", path)  # the reference LLM has not got it
    assert text == greedy(cluster["llm"], [5, 17, 30], 4, lora="dora")
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "dora"}, headers=auth)
    assert r.status_code == 200, r.text
    assert all(ids == {"tiny", "sql"} for ids in model_ids())
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="dora", prompt=[5, 17, 30], max_tokens=4)


def test_health_and_metrics_per_replica(cluster) -> None:
    deadline = time.time() + 20
    while True:
        health = httpx.get(f"{cluster['url']}/health").json()
        if len(health.get("replicas", {})) == 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert health["status"] == "ok" and len(health["replicas"]) == 2, health
    assert all(r["status"] == "ok" for r in health["replicas"].values())
    assert httpx.get(f"{cluster['url']}/metrics").status_code == 401
    text = httpx.get(f"{cluster['url']}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for replica in health["replicas"]:
        assert f'frugallm_generation_tokens_total{{replica="{replica}"}}' in text
    assert text.count("# TYPE frugallm_generation_tokens_total counter") == 1  # one family, a sample per replica
    assert 'frugallm_http_responses_total{replica="ingress",status="200"}' in text


def test_killed_replica_errors_its_request_and_is_replaced(cluster) -> None:
    url, c = cluster["url"], client(cluster)
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200
        victim = r.headers[REPLICA_HEADER]
        before = engine_replicas()
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data:")))
        # A second request with the same prompt, not streamed: prefix affinity sends it to the same replica.
        whole: list[Any] = []
        waiter = threading.Thread(target=lambda: whole.append(httpx.post(
            f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 150}, timeout=60,
            headers={"Authorization": f"Bearer {KEY}"})))
        waiter.start()
        time.sleep(0.5)  # both in flight on the victim
        killer = threading.Thread(target=lambda: ray.kill(
            ray.get_actor(f"SERVE_REPLICA::{APP}#{ENGINE}#{victim}", namespace="serve"), no_restart=True))
        killer.start()
        events += [line for line in lines if line.startswith("data:")]
        killer.join()
        waiter.join()
    assert '"error"' in events[-1] and "replica" in events[-1], events[-3:]  # streaming: an error event
    assert "data: [DONE]" not in events
    assert whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "replica_failed", whole[0].text
    # Ray starts a replacement (a new replica id); then every request succeeds, on the survivor or the new one.
    deadline = time.time() + 60
    while True:
        live = engine_replicas()
        running = serve.status().applications[APP].deployments[ENGINE].replica_states.get("RUNNING", 0)
        if len(live) == 2 and victim not in live and running == 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(live) == 2 and victim not in live and running == 2, (victim, live, running)
    # A fresh prefix goes to the replica that has served the least text: soon the new one.
    got = []
    for i in range(6):
        got.append(replica_of(c.completions.with_raw_response.create(model="tiny", prompt=f"{i} fresh prefix {i}",
                                                                     max_tokens=2)))
        if got[-1] not in before:
            break
    assert set(got) <= live and got[-1] in live - before, (before, live, got)


def engine_replicas() -> set[str]:
    """Ids of the engine replica actors alive now (Ray names them ``SERVE_REPLICA::app#deployment#id``)."""
    prefix = f"SERVE_REPLICA::{APP}#{ENGINE}#"
    return {a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}
