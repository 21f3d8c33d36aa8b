"""The inference command: prompt template, streaming output, one-line errors, trained-context warnings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from longlora_tune.eval.generate import build_prompt, main
from longlora_tune.quickstart.tiny import make_documents


class RecordingStream(io.StringIO):
    """A text stream that remembers every write, to see tokens arrive one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_prompt_is_longlora_inference_prompt() -> None:
    assert build_prompt("A long book.", "Who wrote it?") == "[INST]A long book.\nWho wrote it?[/INST]"
    assert build_prompt("A long book.", "Who wrote it?", "none") == "A long book.\nWho wrote it?"
    assert "### Instruction:\nA long book.\nWho wrote it?" in build_prompt(
        "A long book.", "Who wrote it?", "alpaca"
    )


def test_generate_streams_tokens_and_matches_greedy_decode(tmp_path: Path, tiny_ckpt: Path) -> None:
    material = tmp_path / "long.txt"
    material.write_text(" ".join(make_documents(3, seed=1)))
    argv = ["--checkpoint", str(tiny_ckpt), "--file", str(material), "--question", "What does the cat see?"]
    out = RecordingStream()
    assert (
        main([*argv, "--max-new-tokens", "12", "--temperature", "0", "--training-length", "1024"], out=out)
        == 0
    )
    text = out.getvalue()
    # Several partial writes before the final newline: the answer was streamed, not printed at the end.
    assert len([w for w in out.writes if w]) >= 3 and text.endswith("\n") and text.strip()

    # Greedy answer equals decoding the same prompt through the library directly.
    from torchtune.models.llama2 import llama2_tokenizer

    from longlora_tune.eval.decoding import generate
    from longlora_tune.eval.model_loading import load_eval_model

    tok = llama2_tokenizer(str(tiny_ckpt / "tokenizer.model"), prompt_template=None)
    ids = tok.encode(
        build_prompt(material.read_text(), "What does the cat see?"), add_bos=True, add_eos=False
    )
    model, _ = load_eval_model(tiny_ckpt, max_seq_len=len(ids) + 12, training_length=1024)
    expected = generate(model, ids, max_new_tokens=12, use_cache=False, stop_tokens=[tok.eos_id])
    assert text == tok.decode(expected) + "\n"

    # Sampling with a seed is reproducible.
    a, b = io.StringIO(), io.StringIO()
    main([*argv, "--max-new-tokens", "8", "--seed", "3"], out=a)
    main([*argv, "--max-new-tokens", "8", "--seed", "3"], out=b)
    assert a.getvalue() == b.getvalue()


def test_missing_file_is_one_line_error(
    tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tiny_ckpt), "--file", str(tmp_path / "nope.txt"), "--question", "q"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"longlora_tune: error: --file {tmp_path / 'nope.txt'} does not exist"]


def test_trained_context_comes_from_training_length_adapter_or_rope_factor() -> None:
    from longlora_tune.eval.generate import trained_context_length

    merged = {"max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert trained_context_length(merged, rope_scaling_factor=4.0) == (
        256,
        "RoPE factor 4 x max_position_embeddings 64",
    )
    assert trained_context_length(merged, rope_scaling_factor=16.0, training_length=1000)[0] == 1000
    adapter = {"training_length": 250, "rope_scaling_factor": 4.0}
    base = {"max_position_embeddings": 64}
    assert trained_context_length(base, rope_scaling_factor=4.0, adapter_meta=adapter)[0] == 250
    # An explicit factor other than the adapter's: the loaded factor decides.
    assert trained_context_length(base, rope_scaling_factor=2.0, adapter_meta=adapter)[0] == 128
    assert trained_context_length({}, rope_scaling_factor=1.0)[0] == 4096  # Llama 2's default context


def _stderr_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_prompt_longer_than_the_trained_context_warns_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torchtune.models.llama2 import llama2_tokenizer

    from longlora_tune.quickstart.tiny import make_hf_checkpoint

    # A merged export's config: original context 64, trained with RoPE factor 4, i.e. on 256 tokens.
    ckpt = make_hf_checkpoint(tmp_path / "hf", rope_scaling={"type": "linear", "factor": 4.0})
    tok = llama2_tokenizer(str(ckpt / "tokenizer.model"), prompt_template=None)
    long_file, short_file = tmp_path / "long.txt", tmp_path / "short.txt"
    long_file.write_text(" ".join(make_documents(4, seed=2, min_sentences=20)))
    short_file.write_text("The cat sees the red ball today.")
    question = "What does the cat see?"

    def prompt_len(path: Path) -> int:
        return len(tok.encode(build_prompt(path.read_text(), question), add_bos=True, add_eos=False))

    n_long, n_short = prompt_len(long_file), prompt_len(short_file)
    assert n_long > 256 and n_short + 8 < 256
    argv = ["--checkpoint", str(ckpt), "--question", question, "--temperature", "0", "--max-new-tokens"]

    assert main([*argv, "8", "--file", str(long_file)], out=io.StringIO()) == 0
    warnings = [line for line in _stderr_lines(capsys) if "warning" in line]
    assert warnings == [
        f"longlora_tune: warning: the prompt has {n_long:,} tokens but the model was trained on 256-token "
        "contexts (RoPE factor 4 x max_position_embeddings 64); positions past 256 were never trained, so "
        "expect a degraded answer (repetition, text that ignores the material); shorten --file or use a "
        "model trained on longer contexts"
    ]

    main([*argv, "8", "--file", str(short_file)], out=io.StringIO())
    assert not [line for line in _stderr_lines(capsys) if "warning" in line]

    # The prompt fits but the answer budget does not: a milder warning naming where it runs out.
    main([*argv, "250", "--file", str(short_file)], out=io.StringIO())
    (warning,) = [line for line in _stderr_lines(capsys) if "warning" in line]
    assert f"the prompt ({n_short} tokens) plus up to 250 new tokens" in warning
    assert f"after its first {256 - n_short} tokens" in warning

    # --training-length overrides the checkpoint-derived context.
    main([*argv, "8", "--file", str(long_file), "--training-length", "4096"], out=io.StringIO())
    assert not [line for line in _stderr_lines(capsys) if "warning" in line]


# Each family's torchtune tokenizer, built from the files where a Hugging Face folder keeps them: independent
# of longlora_tune's table, so a wrong entry there shows here.
_FAMILY_TOKENIZERS = {
    "llama3": lambda ckpt: __import__("torchtune.models.llama3", fromlist=["x"]).llama3_tokenizer(
        str(ckpt / "original/tokenizer.model"),
        special_tokens_path=str(ckpt / "original/special_tokens.json"),
    ),
    "mistral": lambda ckpt: __import__("torchtune.models.mistral", fromlist=["x"]).mistral_tokenizer(
        str(ckpt / "tokenizer.model")
    ),
    "qwen2": lambda ckpt: __import__("torchtune.models.qwen2_5", fromlist=["x"]).qwen2_5_tokenizer(
        str(ckpt / "vocab.json"),
        str(ckpt / "merges.txt"),
        special_tokens_path=str(ckpt / "special_tokens.json"),
    ),
}


@pytest.mark.parametrize("family", sorted(_FAMILY_TOKENIZERS))
def test_generate_answers_in_the_family_chat_format(family: str, tmp_path: Path) -> None:
    from torchtune.data import Message

    from longlora_tune.eval.decoding import generate
    from longlora_tune.eval.generate import default_template
    from longlora_tune.eval.model_loading import load_eval_model
    from longlora_tune.quickstart.tiny import make_hf_checkpoint

    ckpt = make_hf_checkpoint(tmp_path / "hf", family=family, max_position_embeddings=256)
    # A base model never saw its chat headers: plain text by default. A chat model (a chat_template in
    # tokenizer_config.json, as instruct checkpoints and their exports have) answers in its chat format.
    assert default_template(family, ckpt) == "none"
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert default_template(family, ckpt) == "chat"
    material = tmp_path / "long.txt"
    material.write_text(" ".join(make_documents(2, seed=1)))
    question = "What does the cat see?"
    out = RecordingStream()
    argv = ["--checkpoint", str(ckpt), "--file", str(material), "--question", question, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "10"], out=out) == 0

    # The prompt is the family tokenizer's own conversation up to the assistant header: what two
    # conversations with different answers share.
    tok = _FAMILY_TOKENIZERS[family](ckpt)
    user = f"{material.read_text()}\n{question}"
    a, b = (
        tok.tokenize_messages(
            [Message(role="user", content=user), Message(role="assistant", content=answer)]
        )[0]
        for answer in ("A bird.", "Zebras never do.")
    )
    ids = a[: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
    # Mistral's [INST] markers are text; the others' headers are special tokens, kept in this decode.
    shown = tok.decode(ids) if family == "mistral" else tok.decode(ids, skip_special_tokens=False)
    assert shown.rstrip().endswith(
        {"llama3": "<|end_header_id|>", "mistral": "[/INST]", "qwen2": "assistant"}[family]
    )
    model, _ = load_eval_model(ckpt, max_seq_len=len(ids) + 10)
    expected = generate(model, ids, max_new_tokens=10, use_cache=False, stop_tokens=tok.stop_tokens)
    assert out.getvalue() == tok.decode(expected) + "\n"


def test_tokenizer_and_template_errors_are_one_line(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    from longlora_tune.quickstart.tiny import make_hf_checkpoint

    material = tmp_path / "m.txt"
    material.write_text("The cat sees the red ball today.")
    qwen = make_hf_checkpoint(tmp_path / "qwen", family="qwen2")
    (qwen / "merges.txt").unlink()
    for checkpoint, extra, message in [
        (qwen, [], f"tokenizer file not found: {qwen / 'merges.txt'} (qwen2 merges_file); put it in {qwen}"),
        (
            tiny_ckpt,
            ["--tokenizer", str(tmp_path / "none.model")],
            f"tokenizer file not found: {tmp_path / 'none.model'} (llama2 path); "
            "pass --tokenizer /path/to/it",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(checkpoint), "--file", str(material), "--question", "q", *extra])
        assert exit_info.value.code == 2
        assert _stderr_lines(capsys) == [f"longlora_tune: error: {message}"]
    # Llama 2's tokenizer has no chat format of its own: LongLoRA's [INST] prompt is its template.
    with pytest.raises(SystemExit):
        main(
            ["--checkpoint", str(tiny_ckpt), "--file", str(material), "--question", "q", "--template", "chat"]
        )
    assert _stderr_lines(capsys) == [
        "longlora_tune: error: --template chat: Llama 2's tokenizer has no chat format of its own; use "
        "--template llama2_chat (LongLoRA's [INST] prompt)"
    ]


def test_trained_context_of_a_yarn_or_llama3_export_is_the_context_it_serves() -> None:
    from longlora_tune.eval.generate import trained_context_length

    # What a yarn x4 export of a 256-token base writes: max_position_embeddings is the served context.
    yarn = {
        "max_position_embeddings": 1024,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    }
    assert trained_context_length(yarn, rope_scaling_factor=4.0) == (
        1024,
        "the yarn RoPE setting in config.json, factor 4",
    )
    assert trained_context_length(yarn, rope_scaling_factor=8.0)[0] == 2048
    llama31 = {
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert trained_context_length(llama31, rope_scaling_factor=8.0)[0] == 131072
