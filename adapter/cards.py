"""What artifacts say about themselves in words: the model card every trained folder carries (its frame, one writer
for the fine-tuned model's, the reranker's and the exported adapter's) and the relative change shown beside every
score."""

from __future__ import annotations

from collections.abc import Sequence


def pct_change(new: float, old: float, *, zero: str = "n/a") -> str:
    """The relative change from ``old`` to ``new``, as "+5.7%"; ``zero`` when ``old`` is 0."""
    return f"{(new - old) / old:+.1%}" if old else zero


def model_card(front_matter: Sequence[str], title: str, body: Sequence[str]) -> str:
    """A model folder's README.md: YAML front matter (its lines, as the Hugging Face Hub reads them), a title, then
    the body's lines."""
    return "\n".join(["---", *front_matter, "---", "", f"# {title}", "", *body]) + "\n"
