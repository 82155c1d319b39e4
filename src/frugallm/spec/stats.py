"""``SpecStats``: what speculation did in a run (acceptance, by position, time split, memory it added)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counters of one or more speculative runs (``merge`` adds another's)."""

    rounds: int = 0  # verify passes
    plain_steps: int = 0  # one-row decode steps (speculation off, nothing proposed, or measuring)
    shadow_rounds: int = 0  # free guesses checked against plain steps' tokens while off (spec/adaptive.py)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens produced by verify rounds (kept drafts + the target's token)
    proposed_at: list[int] = field(default_factory=list)  # [i]: rounds with a draft token at position i
    accepted_at: list[int] = field(default_factory=list)  # [i]: rounds whose draft token i was kept
    draft_s: float = 0.0
    verify_s: float = 0.0
    plain_s: float = 0.0
    memory_bytes: int = 0  # SpecMemo: draft weights + draft KV + reserved candidate slots + verify logits
    # SpecMemo in the server (engine/spec_solo.py): requests that decoded without speculation because the KV pool
    # could not spare the blocks its memory is charged as, and plain steps taken while it could not spare the draft's.
    memory_fallbacks: int = 0
    memory_gated_steps: int = 0

    def record_round(self, k: int, kept: int, t_draft: float, t_verify: float, emitted: int) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += kept
        self.emitted += emitted
        while len(self.proposed_at) < k:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for i in range(k):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < kept
        self.draft_s += t_draft
        self.verify_s += t_verify

    def merge(self, other: SpecStats) -> None:
        for name in ("rounds", "plain_steps", "shadow_rounds", "drafted", "accepted", "emitted", "draft_s", "verify_s",
                     "plain_s", "memory_fallbacks", "memory_gated_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.proposed_at, other.proposed_at), (self.accepted_at, other.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        self.memory_bytes = max(self.memory_bytes, other.memory_bytes)

    @property
    def acceptance_rate(self) -> float:
        """Kept / verified draft tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify pass (kept drafts + the target's own token): the speedup ceiling of the rounds."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at, strict=True)]

    @property
    def measured_speedup(self) -> float | None:
        """The whole decode's tokens per second (verify rounds, plain steps and the draft's time) over the plain
        steps' own rate; 1.0 when speculation never ran a round; None before a plain step was timed."""
        if not self.plain_steps or self.plain_s <= 0:
            return None
        if not self.rounds:
            return 1.0
        rate = (self.emitted + self.plain_steps) / (self.draft_s + self.verify_s + self.plain_s)
        return rate / (self.plain_steps / self.plain_s)

    @property
    def draft_share(self) -> float:
        """The draft's share of decode time."""
        total = self.draft_s + self.verify_s + self.plain_s
        return self.draft_s / total if total else 0.0

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "spec_rounds": self.rounds,
            "spec_plain_steps": self.plain_steps,
            "spec_shadow_rounds": self.shadow_rounds,
            "spec_drafted": self.drafted,
            "spec_accepted": self.accepted,
            "spec_acceptance_rate": round(self.acceptance_rate, 4),
            "spec_mean_accepted_length": round(self.mean_accepted_length, 3),
            "spec_acceptance_by_position": [round(x, 3) for x in self.acceptance_by_position],
            "spec_draft_share": round(self.draft_share, 4),
            "spec_memory_bytes": self.memory_bytes,
            "spec_memory_fallbacks": self.memory_fallbacks,
            "spec_memory_gated_steps": self.memory_gated_steps,
        }
