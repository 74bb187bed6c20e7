"""The runner's padding-free batches and chunked loss (data.packing: true, train.kernels: auto)
train the tiny model as the plain Trainer path does (padded batches, the model's own loss on
full logits): the same losses at every step, on the CPU. (As shipped, packing: auto pads the
tiny model: its packed rows would cost more attention than the padding they save.)

LoRA dropout is 0 here: its masks are drawn over the batch's shape, [2, longest] padded or
[1, tokens] packed, so with dropout the two runs see different random masks and their losses
agree only statistically, not step by step."""

from __future__ import annotations

import pytest

from tests.helpers import read_json, run_runner, tiny_job, train_losses

STEPS = 12


def run(tmp_path, name: str, **train_and_data) -> tuple[dict[int, float], dict, str]:
    data = {k: train_and_data.pop(k) for k in ("packing",) if k in train_and_data}
    config = tiny_job(tmp_path / f"{name}.yaml", lora={"dropout": 0.0}, data=data,
                      train={"max_steps": STEPS, "save_every": STEPS, **train_and_data})
    out = tmp_path / name
    proc = run_runner(config, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return train_losses(out), read_json(out / "eval.json"), (out / "runner.log").read_text()


def test_padding_free_batches_and_the_chunked_loss_train_as_padded_batches_and_full_logits(tmp_path):
    plain, plain_eval, plain_log = run(tmp_path, "plain", packing=False, kernels="none")
    shipped, shipped_eval, shipped_log = run(tmp_path, "packed", packing=True)
    assert "kernels: the model's own loss; batches: padded (data.packing: false)" in plain_log
    assert "kernels: chunked loss (no full logits); batches: padding-free (data.packing: true)" in shipped_log
    assert list(shipped) == list(range(1, STEPS + 1)) == list(plain)
    # float sums in another order (attention over a masked row, the loss by chunks): ~1e-6 apart
    assert shipped == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert plain[STEPS] < 0.6 * plain[1]  # and they trained
    assert shipped_eval["test_loss"] == pytest.approx(plain_eval["test_loss"], rel=1e-4)
