"""The gateway's memory budget, set once (`memory_budget_mb`), split among the stages that hold
what requests bring; a stage's own setting, when given, overrides its share.

Shares of the budget (at the default 4096 MiB they are the limits the gateway had before it had
a budget):

| stage | setting | share |
|---|---|---|
| request bodies and the stored files and remote URLs requests fetch | max_buffered_bytes | 1/4 |
| decoding attachments, split among the decoding workers | max_decode_mb (each) | 1/2 |
| prefixes of recent attachments | prefix_cache_mb | 1/16 |
| stored responses, media uuids | stored_responses_mb, references_mb | 1/64, 1/256 |

The rest (about 1/6) is left for what no setting counts: encoder batches, streamed downloads'
chunks, the engine's per-request state, Python's own. The model's weights and, with the
embedded engine, its KV cache come on top of the budget."""

from dataclasses import dataclass

MiB = 1 << 20
BODIES, DECODING, PREFIXES, RESPONSES, REFERENCES = 1 / 4, 1 / 2, 1 / 16, 1 / 64, 1 / 256


@dataclass(frozen=True)
class Split:
    """What each stage may hold, in bytes."""

    bodies: int
    decode_each: int
    workers: int
    prefixes: int
    responses: int
    references: int

    @property
    def total(self) -> int:
        return self.bodies + self.decode_each * self.workers + self.prefixes + self.responses + self.references

    def describe(self) -> str:
        mib = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        return (f"request bodies and fetched files {mib(self.bodies)}, decoding {self.workers} x "
                f"{mib(self.decode_each)}, prefix cache {mib(self.prefixes)}, stored responses "
                f"{mib(self.responses)}, media uuids {mib(self.references)}")


def format_bytes(n: int) -> str:
    """A limit as its setting reads in errors: whole MiB where it is one, else bytes."""
    return f"{n >> 20} MiB" if n and n % MiB == 0 else f"{n} bytes"


def shares(budget_mb: float, workers: int) -> dict[str, float]:
    """The budget's share of each stage's setting, in that setting's own unit."""
    budget = budget_mb * MiB
    return {"max_buffered_bytes": int(budget * BODIES), "max_decode_mb": budget_mb * DECODING / workers,
            "prefix_cache_mb": budget_mb * PREFIXES, "stored_responses_mb": budget_mb * RESPONSES,
            "references_mb": budget_mb * REFERENCES}


def split_of(settings) -> Split:
    return Split(settings.max_buffered_bytes, int(settings.max_decode_mb * MiB), settings.preprocess_workers,
                 int(settings.prefix_cache_mb * MiB), int(settings.stored_responses_mb * MiB),
                 int(settings.references_mb * MiB))
