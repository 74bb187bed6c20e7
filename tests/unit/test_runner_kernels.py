"""The runner's chunked loss and padding-free batches (runner/qlora_runner.py, "Kernels and the
loss"), against what they stand in for: transformers' own causal LM loss on full logits, and padded
batches. Liger's kernels need CUDA and Triton: only the choice of them is tested here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from tests.helpers import TINY_MODEL, load_runner_module

runner = load_runner_module()


def random_case(seed: int, tokens: int = 37, hidden: int = 24, vocab: int = 50, batch: int = 3):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, tokens, hidden, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(hidden, vocab, bias=True).double()
    labels = torch.randint(0, vocab, (batch, tokens), generator=generator)
    labels[torch.rand(batch, tokens, generator=generator) < 0.3] = -100  # prompts and padding
    return h, head, labels


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("num_items", [None, 41])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logits_loss(chunk, num_items):
    h, head, labels = random_case(seed=chunk)
    h.requires_grad_(True)
    expected = ForCausalLMLoss(head(h), labels, head.out_features, num_items_in_batch=num_items)
    expected.backward()
    want = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    h.grad = head.weight.grad = head.bias.grad = None

    loss = runner.chunked_causal_lm_loss(h, head, labels, num_items, chunk_tokens=chunk)
    (loss * 3).backward()  # an outer scale (gradient accumulation, DDP) reaches every gradient
    # both compute the logits' softmax in fp32, as transformers does; the sums differ in order only
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, wanted in zip((h.grad, head.weight.grad, head.bias.grad), want):
        torch.testing.assert_close(got, 3 * wanted, rtol=1e-5, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none():
    h, head, labels = random_case(seed=3)
    head.requires_grad_(False)
    with torch.no_grad():  # validation: the loss alone
        value = runner.chunked_causal_lm_loss(h, head, labels, chunk_tokens=5)
    h.requires_grad_(True)
    loss = runner.chunked_causal_lm_loss(h, head, labels, chunk_tokens=5)
    loss.backward()
    assert value.item() == pytest.approx(loss.item(), rel=1e-7) and head.weight.grad is None
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_only_ignored_labels_give_zero_not_nan():
    h, head, labels = random_case(seed=4)
    labels[:] = -100
    h.requires_grad_(True)
    loss = runner.chunked_causal_lm_loss(h, head, labels)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.abs().sum()


def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)


def test_the_tiny_model_with_the_chunked_loss_trains_as_with_its_own():
    plain, chunked = tiny_model(), tiny_model()
    assert runner.chunked_loss_applies(chunked) is None
    runner.use_chunked_loss(chunked)
    ids = torch.randint(3, plain.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    want = plain(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50))
    got = chunked(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50))
    assert got.logits is None  # never materialised
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    want.loss.backward()
    got.loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without labels (scoring, generation) the model's own forward, logits and all
    assert chunked(input_ids=ids).logits.shape == (2, 20, plain.config.vocab_size)


def test_a_model_with_softcapped_logits_keeps_its_own_loss():
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in runner.chunked_loss_applies(model)


LIGER_TYPES = frozenset({"llama", "qwen2"})


@pytest.mark.parametrize("requested, device, importable, model_type, chosen", [
    ("auto", "cuda", True, "llama", "liger"),
    ("auto", "cuda", True, "phi", "chunked"),  # Liger has nothing for it: our own loss
    ("auto", "cuda", False, "llama", "chunked"),  # not installed
    ("auto", "cpu", False, "llama", "chunked"),
    ("none", "cuda", True, "llama", "none"),
    ("liger", "cuda", True, "qwen2", "liger"),
])
def test_the_kernels_chosen(requested, device, importable, model_type, chosen):
    assert runner.choose_kernels(requested, device, importable, LIGER_TYPES, model_type) == chosen


@pytest.mark.parametrize("device, importable, model_type, error, says", [
    ("cpu", False, "llama", "ConfigError", "train.kernels: liger needs a CUDA GPU"),
    ("cuda", False, "llama", "EnvironmentProblem", "pip install liger-kernel"),
    ("cuda", True, "phi", "ConfigError", "no kernels for model type 'phi'"),
])
def test_kernels_liger_where_it_cannot_run_is_one_clear_error(device, importable, model_type, error, says):
    with pytest.raises(getattr(runner, error), match=says):
        runner.choose_kernels("liger", device, importable, LIGER_TYPES, model_type)


def test_kernels_liger_on_a_cpu_job_is_refused_with_the_config():
    with pytest.raises(runner.ConfigError, match="train.kernels: liger needs a CUDA GPU"):
        runner.from_dict(runner.TrainSection, {"device": "cpu", "kernels": "liger"}, "train")


def examples(lengths: list[int], seed: int = 2) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def test_a_padding_free_row_restarts_positions_and_masks_each_first_label():
    batch = runner.collate_padding_free(examples([4, 6]))
    assert batch["input_ids"].shape == (1, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"][0, 0].item() == -100 and batch["labels"][0, 4].item() == -100


def test_packed_examples_do_not_see_each_other_and_the_loss_equals_the_padded_batch():
    model = tiny_model().eval()
    features = examples([9, 23, 14])
    packed = runner.collate_padding_free(features)
    padded = runner.collate(features, pad_id=0)
    assert packed["use_cache"] is False  # with a cache, transformers would not read the packed positions
    with torch.no_grad():
        row = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for f in features:  # each example's logits as if it were alone
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(row[start:start + len(f["input_ids"])], alone, rtol=1e-4, atol=1e-5)
            start += len(f["input_ids"])
        items = sum(sum(x != -100 for x in f["labels"][1:]) for f in features)
        loss_packed = model(**packed, num_items_in_batch=torch.tensor(items)).loss
        loss_padded = model(**padded, num_items_in_batch=torch.tensor(items)).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)


UNEVEN = [4] * 15 + [64]  # 16 lengths: padded rows of ~43 tokens for 7.75 real ones
EVEN = [60] * 16


@pytest.mark.parametrize("packing, model_type, remote, chosen", [
    ("auto", "llama", False, True), ("auto", "gpt2", False, False), ("auto", "llama", True, False),
    (False, "llama", False, False), (True, "qwen2", False, True),
])
def test_padding_free_where_it_is_safe(packing, model_type, remote, chosen):
    model = tiny_model()
    model.config.model_type = model_type
    assert runner.choose_padding_free(packing, model, remote, UNEVEN, 16)[0] is chosen


def test_auto_pads_where_a_packed_row_attention_costs_more_than_the_padding():
    """The tiny model is narrow (width 128): 16 even examples in one row of 960 tokens spend more
    on attention across that row than 16 padded rows of 60 spend on anything."""
    model = tiny_model()
    chosen, why = runner.choose_padding_free("auto", model, False, EVEN, 16)
    assert not chosen and "a packed micro batch computes" in why
    assert float(why.split("computes ")[1].split("x")[0]) > 1
    assert runner.choose_padding_free(True, model, False, EVEN, 16)[0]  # true insists
    assert runner.choose_padding_free("auto", model, False, UNEVEN, 16)[0]


def test_flash_attention_packs_whatever_the_lengths():
    config = SimpleNamespace(model_type="llama", _attn_implementation="flash_attention_2")
    assert runner.choose_padding_free("auto", SimpleNamespace(config=config), False, EVEN, 16) == (
        True, "flash_attention_2 attends within each example")


def test_a_packed_row_pays_on_a_wide_model_and_not_on_a_narrow_one():
    llama_8b = runner.ComputeShape(matmul_params=6_979_321_856 + 525_336_576, layers=32, attention_width=4096)
    narrow = runner.ComputeShape.of(tiny_model().config)
    # by hand: 2400 x (2 x 7.5e9 + 4 x 32 x 2400 x 4096) / (8 x 900 x (2 x 7.5e9 + 4 x 32 x 900 x 4096))
    assert runner.packed_over_padded_flops(llama_8b, 8, 300, 900) == pytest.approx(0.350, abs=0.001)
    # the tiny config's shape of batch: 16 examples of 40 tokens on average, padded to 60
    assert runner.packed_over_padded_flops(llama_8b, 16, 40, 60) < 0.7
    assert runner.packed_over_padded_flops(narrow, 16, 40, 60) > 1.05
    # even lengths: packing saves no padding and only adds attention
    assert runner.packed_over_padded_flops(llama_8b, 8, 512, 512) > 1


def test_mean_longest_of_a_batch():
    assert runner.mean_longest_of([(5, 3)], 4) == pytest.approx(5)  # (length, examples)
    assert runner.mean_longest_of([(1, 1), (2, 1)], 1) == pytest.approx(1.5)
    assert runner.mean_longest_of([(1, 1), (2, 1)], 2) == pytest.approx(2 * 0.75 + 1 * 0.25)  # drawn with replacement


def test_packing_true_on_a_model_not_known_to_keep_examples_apart_is_refused():
    model = tiny_model()
    model.config.model_type = "gpt2"
    with pytest.raises(runner.ConfigError, match="data.packing: true, but model type 'gpt2'.*set data.packing: false"):
        runner.choose_padding_free(True, model, False, UNEVEN, 16)


def test_fp16_keeps_the_small_gradients_of_a_long_accumulation():
    """Under fp16 mixed precision (a T4) a token's share of the loss is 1/num_items_in_batch,
    5e-7 here: a subnormal in fp16, in the gradient or in a matmul's input under autocast. The
    chunks keep d(sum of losses), of order one, and backward divides in fp32 with the loss scale
    (GradScaler's 65536), so the gradient is as right as fp16 logits allow."""
    h, head, labels = random_case(seed=5, tokens=200)
    exact = h.clone().requires_grad_(True)
    (runner.chunked_causal_lm_loss(exact, head, labels, num_items_in_batch=2_000_000) * 65536).backward()
    head32 = torch.nn.Linear(head.in_features, head.out_features).float()  # as prepare_model_for_kbit_training leaves it
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    h16 = h.to(torch.float16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):  # the Trainer's fp16 mixed precision
        loss = runner.chunked_causal_lm_loss(h16, head32, labels, num_items_in_batch=2_000_000)
    (loss * 65536).backward()
    assert h16.grad.dtype == torch.float16
    error = (h16.grad.double() - exact.grad).norm() / exact.grad.norm()
    assert error < 0.02, error  # 0.35 when the chunks held the divided gradient
