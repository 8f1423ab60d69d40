"""What the bench scripts share: AppleQA converted and split the documented way."""

from __future__ import annotations

from pathlib import Path


def appleqa(shared: Path, work: Path, by: str = "query") -> Path:
    """AppleQA from ../shared as a dataset folder under ``work``, split by ``by`` with seed 0 and 20% held out."""
    from adapter.data import convert, split_dataset

    out = work / f"appleqa-{by}"
    convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", out)
    split_dataset(out, by=by, test_fraction=0.2, seed=0)
    return out
