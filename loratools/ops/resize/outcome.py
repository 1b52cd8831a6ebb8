"""What a resize reports: per layer, per output file, per input LoRA (tables, ``--json``, the API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LayerRow:
    """One layer of one recipe: ranks and the error the selection costs."""

    name: str
    kind: str
    old_rank: int
    new_rank: int
    rle_lora: float  # ||dropped sigma|| / ||sigma||
    rle_ckpt: float | None  # ||dropped sigma|| / ||W||_F
    matched: bool


#: ``RecipeOutcome.status`` values and what the summary line adds for them.
STATUS_NOTES = {
    "written": "",
    "dry-run": " (dry run)",
    "exists": " (exists, skipped)",
    "larger": " (its tensors would be larger than the input's: not written; --allow-larger writes it)",
}


@dataclass
class RecipeOutcome:
    """One output file (or, with ``dry_run``, the prediction of it)."""

    recipe: str
    path: Path
    threshold: float | None
    status: str  # a key of STATUS_NOTES
    size_before: int
    size_after: int
    rank_before: int
    rank_after: int
    fro_retained: float
    layers_kept: int
    layers_dropped: list[str] = field(default_factory=list)
    rows: list[LayerRow] = field(default_factory=list)
    quantiles: dict[str, float] = field(default_factory=dict)

    def summary_line(self) -> str:
        """``name: rank 1234 -> 321, 36.2 MiB -> 9.1 MiB, Frobenius 98.7 %, threshold -3.55`` (sizes in
        the unit that shows the change: ``484.5 KiB -> 465.4 KiB``, not ``0.5 MiB -> 0.5 MiB``)."""
        from loratools.units import human_bytes, size_change

        thr = "" if self.threshold is None else f", threshold {self.threshold:.4g}"
        if self.status == "exists":  # nothing was computed: say what is on disk
            return f"{self.path.name}: rank {self.rank_after}, {human_bytes(self.size_after)}{STATUS_NOTES['exists']}"
        return (f"{self.path.name}: rank {self.rank_before} -> {self.rank_after}, "
                f"{size_change(self.size_before, self.size_after)}, "
                f"Frobenius {100 * self.fro_retained:.1f} %{thr}{STATUS_NOTES.get(self.status, '')}")


@dataclass
class LoraOutcome:
    """Everything about one input LoRA."""

    path: Path
    outcomes: list[RecipeOutcome]
    warnings: list[str] = field(default_factory=list)
    zero_layers: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)  # input kind -> modules written as another kind
    passthrough: list[str] = field(default_factory=list)
    seconds: float = 0.0
