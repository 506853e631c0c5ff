"""The SALAM experiment's settings, in a module of their own with no heavy imports (no agents, no autogen): the
command line reads their fields for the options of ``redpen run``, ``gather`` and ``exam`` at every start."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.bounds import check_bounds, within
from runtime.defaults import MOST_IN_FLIGHT, RETRIEVAL_K, RETRIEVAL_THRESHOLD, ROUNDS


@dataclass(frozen=True)
class ExperimentSettings:
    """How ``redpen run`` gathers and examines; each bounded field is the option of the same name."""

    task: str = field(metadata={"help": "the benchmark task the run is named after and its memory's records carry"})
    # At most 20 rounds: SALAM stops at 3, and later rounds rarely turn a wrong answer right; each is two model calls.
    rounds: int = field(default=ROUNDS, metadata={"help": "feedback rounds per gathered question", **within(1, 20)})
    # At most 50 mistakes: each goes into the assistant's prompt, which 50 already overflow on small models.
    k: int = field(default=RETRIEVAL_K, metadata={"help": "mistakes retrieved per examined question", **within(1, 50)})
    threshold: float | None = field(
        default=RETRIEVAL_THRESHOLD,
        metadata={"help": "least cosine similarity of a retrieved mistake", **within(0.0, 1.0)},
    )
    concurrency: int | None = field(  # None: as many as the student's backend serves at once
        default=None,
        metadata={
            "help": "conversations in flight at once [default: as many as the student's backend serves at once: "
            "its batch locally (32), max_concurrency on a server (256)]",
            **within(1, MOST_IN_FLIGHT),
        },
    )

    def __post_init__(self) -> None:
        check_bounds(self, options=True)
