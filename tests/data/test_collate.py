"""Collation: padding layout, and that padded or packed batches give each sample's own loss under S²-Attn."""

import json

import pytest
import torch
import torch.nn.functional as F
from torchtune.data import padded_collate_packed
from torchtune.datasets import PackedDataset
from torchtune.models.llama2 import llama2_tokenizer

from longlora_tune.data import longalpaca_dataset, padded_collate_s2
from longlora_tune.models import longlora_llama2
from longlora_tune.modules.s2_attention import S2Attention
from longlora_tune.quickstart.tiny import make_tokenizer

IGNORE = -100
GROUP = 4


def _sample(n, start=10):
    tokens = list(range(start, start + n))
    return {"tokens": tokens, "labels": [IGNORE] * min(2, n) + tokens[2:]}


def test_right_padding_values_and_shapes():
    batch = [_sample(3), _sample(5, start=50), _sample(1, start=90)]
    out = padded_collate_s2(batch, pad_id=7, ignore_idx=-1)
    assert out["tokens"].dtype == out["labels"].dtype == torch.long
    assert out["tokens"].tolist() == [
        [10, 11, 12, 7, 7],
        [50, 51, 52, 53, 54],
        [90, 7, 7, 7, 7],
    ]
    assert out["labels"].tolist() == [
        [IGNORE, IGNORE, 12, -1, -1],
        [IGNORE, IGNORE, 52, 53, 54],
        [IGNORE, -1, -1, -1, -1],
    ]


@pytest.mark.parametrize(
    "lengths,multiple,expected", [((3, 5), 4, 8), ((8, 2), 4, 8), ((9,), 8, 16), ((5,), 1, 5)]
)
def test_pad_to_multiple_of(lengths, multiple, expected):
    batch = [_sample(n) for n in lengths]
    out = padded_collate_s2(batch, pad_to_multiple_of=multiple)
    assert out["tokens"].shape == out["labels"].shape == (len(lengths), expected)
    for row, n in zip(range(len(lengths)), lengths):
        assert out["tokens"][row, n:].eq(0).all() and out["labels"][row, n:].eq(IGNORE).all()
        assert out["tokens"][row, :n].tolist() == batch[row]["tokens"]


def test_torchtune_recipe_keywords_and_errors():
    # torchtune recipes call the collate with padding_idx=/ignore_idx=.
    out = padded_collate_s2([_sample(1), _sample(2)], padding_idx=3, ignore_idx=IGNORE)
    assert out["tokens"][0, 1].item() == 3
    with pytest.raises(ValueError, match="empty batch"):
        padded_collate_s2([])
    with pytest.raises(ValueError, match="pad_to_multiple_of=0 must be a positive integer"):
        padded_collate_s2([_sample(2)], pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"sample 0: tokens \(2,\) and labels \(1,\)"):
        padded_collate_s2([{"tokens": [1, 2], "labels": [1]}])


def _model(vocab_size):
    torch.manual_seed(0)
    model = longlora_llama2(
        vocab_size=vocab_size,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        intermediate_dim=64,
        max_seq_len=64,
        original_max_seq_len=64,
        lora_rank=4,
        s2_group_size=GROUP,
        s2_backend="sdpa",
    )
    # LoRA B starts at zero; make the adapters matter so the check covers them too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    assert any(isinstance(m, S2Attention) for m in model.modules())
    return model.train()


def _per_sample_loss(model, tokens, labels, **kwargs):
    logits = model(tokens, **kwargs)
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).double(), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )
    return ce.sum(dim=1)


def test_padded_batch_gives_each_samples_own_loss_under_s2():
    model = _model(vocab_size=128)
    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (13, 22, 6):
        tokens = torch.randint(3, 128, (n,), generator=g).tolist()
        samples.append({"tokens": tokens, "labels": [IGNORE] * 3 + tokens[3:]})
    batch = padded_collate_s2(samples, pad_to_multiple_of=GROUP)
    assert batch["tokens"].shape == (3, 24)
    with torch.no_grad():
        batched = _per_sample_loss(model, batch["tokens"], batch["labels"])
        alone = torch.cat(
            [
                _per_sample_loss(model, torch.tensor([s["tokens"]]), torch.tensor([s["labels"]]))
                for s in samples
            ]
        )
        # S² is really engaged: full attention (eval mode) scores the longer samples differently.
        full = _per_sample_loss(model.eval(), batch["tokens"], batch["labels"])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert (full[:2] - batched[:2]).abs().min() > 1e-4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return llama2_tokenizer(str(path), prompt_template=None)


def test_longalpaca_packs_with_torchtune_packed_collate(tokenizer, tmp_path):
    sentences = ["The cat sees the red ball.", "A dog follows a small bird today.", "My sister likes it."]
    records = [{"instruction": f"Say: {s}", "input": "", "output": s} for s in sentences for _ in range(2)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    kwargs = dict(source="json", data_files=str(path), max_seq_len=64)
    plain = longalpaca_dataset(tokenizer, **kwargs)
    packed = longalpaca_dataset(tokenizer, packed=True, **kwargs)
    assert isinstance(packed, PackedDataset) and len(packed) < len(plain)

    batch = padded_collate_packed([packed[0], packed[1]])
    assert batch["tokens"].shape == batch["labels"].shape == batch["input_pos"].shape == (2, 64)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (2, 64, 64)  # dense on CPU
    n_first = len(plain[0]["tokens"])
    assert batch["tokens"][0, :n_first].tolist() == plain[0]["tokens"]
    assert batch["labels"][0, :n_first].tolist() == plain[0]["labels"]

    model = _model(vocab_size=tokenizer.vocab_size)
    # Split the packed rows back into documents (input_pos restarts at 0 for each).
    docs, starts = [], []
    for row in range(2):
        pos = batch["input_pos"][row].tolist()
        bounds = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(bounds, bounds[1:]):
            docs.append((row, a, b))
            starts.append(a)

    def doc_losses(model):
        logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        out = []
        for row, a, b in docs:
            lg, lab = logits[row : row + 1, a : b - 1], batch["labels"][row : row + 1, a + 1 : b]
            out.append(
                F.cross_entropy(lg.transpose(1, 2).double(), lab, ignore_index=IGNORE, reduction="sum")
            )
        return torch.stack(out)

    def alone_losses(model):
        out = []
        for row, a, b in docs:
            tokens, labels = batch["tokens"][row : row + 1, a:b], batch["labels"][row : row + 1, a:b]
            out.append(_per_sample_loss(model, tokens, labels)[0])
        return torch.stack(out)

    with torch.no_grad():
        # Full attention: packing is exactly equivalent to one forward per document.
        model.eval()
        torch.testing.assert_close(doc_losses(model), alone_losses(model), rtol=1e-5, atol=1e-5)
        # S²: the groups are laid out over the pack, so only a pack's first document (which starts at a
        # group boundary) has the same pattern as alone; the document mask must keep the rest finite.
        model.train()
        packed_s2, alone_s2 = doc_losses(model), alone_losses(model)
    first = torch.tensor([s == 0 for s in starts])
    torch.testing.assert_close(packed_s2[first], alone_s2[first], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed_s2).all()
