"""One rank of a fine-tune on the tiny BERT, run by tests/test_finetune.py under ``torchrun --nproc_per_node 2``.

Records what the test cannot see from outside the processes: how many rows the loss gathered across ranks for each
local batch, whether the trainer wrapped the model in DDP, and a checksum of this rank's weights after every optimizer
step and after training (DDP must keep the replicas identical at every step, not only once the best checkpoint is
loaded back at the end).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py DATA OUT MODEL REPORT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking as mnrl
from sentence_transformers import SentenceTransformerTrainer
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback

from adapter.config import Config
from adapter.data import load_dataset
from adapter.finetune import finetune


def main() -> None:
    data, out, model, report = sys.argv[1:5]
    gathered: list[tuple[int, int]] = []  # (local rows, rows after gathering) per gather call
    checksum: list[float] = []
    steps: list[float] = []  # the weights' checksum after each optimizer step
    wrapped: list[bool] = []
    real_gather, real_train = mnrl.all_gather_with_grad, SentenceTransformerTrainer.train

    def spy_gather(tensor):
        result = real_gather(tensor)
        gathered.append((tensor.shape[0], result.shape[0]))
        return result

    def weights(model) -> float:
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    def spy_train(self, *args, **kwargs):
        trainer = self

        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                steps.append(weights(trainer.model))
                wrapped.append(isinstance(trainer.model_wrapped, DistributedDataParallel))

        self.add_callback(Steps())
        output = real_train(self, *args, **kwargs)
        checksum.append(weights(self.model))
        return output

    mnrl.all_gather_with_grad = spy_gather
    SentenceTransformerTrainer.train = spy_train
    cfg = Config().replace(encoder={"model": model}, dims=(32, 16), select_dim=16, grad_accum=1, val_fraction=0.3,
                           finetune={"epochs": 2, "batch_size": 2, "lr": 1e-3})
    result = finetune(load_dataset(data), out, cfg, progress=False)
    rank = int(os.environ["RANK"])
    Path(report, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": result.world_size, "main_process": result.main_process, "gathered": gathered,
        "checksum": checksum[0], "steps": steps, "wrapped": wrapped}))


if __name__ == "__main__":
    main()
