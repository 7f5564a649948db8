"""The embedded default model (moe/assets/default): what `moe generate` runs with no MODEL."""
import pytest
import torch

import moe
from moe.tiny import ASSETS_DEFAULT, default_model_is_embedded

pytestmark = pytest.mark.skipif(not default_model_is_embedded(), reason="no embedded default model")


@pytest.fixture(scope="module")
def default():
    return moe.load_model(ASSETS_DEFAULT, dtype=torch.float32), moe.Tokenizer.from_dir(ASSETS_DEFAULT)


def test_default_model_is_the_promised_shape_and_fits_the_repository(default):
    model, _ = default
    cfg = model.config
    assert cfg.model_type == "mixtral" and cfg.num_experts >= 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers >= 4
    size = sum(p.stat().st_size for p in ASSETS_DEFAULT.iterdir())
    assert size <= 15 * 1024 * 1024, f"embedded default model is {size / 2**20:.1f} MiB (> 15 MiB)"


def test_default_model_equals_transformers(default):
    transformers = pytest.importorskip("transformers")
    model, tok = default
    ref = transformers.AutoModelForCausalLM.from_pretrained(ASSETS_DEFAULT, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    return")])
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_default_model_writes_readable_python_like_text(default):
    """Trained, not random: greedy text is mostly printable ASCII, with Python keywords."""
    model, tok = default
    text = moe.generate(model, tok, ["import os\n\n\ndef "], moe.SamplingParams(max_new_tokens=60))[0]
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text) / max(1, len(text))
    assert printable > 0.95 and "\ufffd" not in text, text
    assert any(w in text for w in ("def ", "return", "self", "(", ":")), text
    # and far better than chance on held-out-like text: the loss of a stdlib snippet
    ids = torch.tensor([tok.encode("def main(argv=None):\n    parser = argparse.ArgumentParser()\n    args = parser.parse_args(argv)\n")])
    with torch.no_grad():
        logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert loss < 0.5 * torch.log(torch.tensor(float(model.config.vocab_size))).item(), loss
