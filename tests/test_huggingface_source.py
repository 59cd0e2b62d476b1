"""`huggingface:DIR` model sources: a small ViT image classifier and its image processor saved here with
`save_pretrained`, loaded from the directory alone (local files only, safetensors only, no remote code),
the processor's normalization as the preprocessing and the config's labels as the class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import harness
from harness.core.errors import BadInput
from harness.sources.models import load_model

transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]' (transformers is a dev dependency)")

MEAN, STD = [0.3], [0.2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    # initializer_range 1: a random ViT whose logits depend on the image (at the default 0.02 every image gets one class)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, num_labels=10, initializer_range=1.0, id2label={i: f"digit {i}" for i in range(10)},
                                 label2id={f"digit {i}": i for i in range(10)})
    torch.manual_seed(0)
    net = transformers.ViTForImageClassification(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "vit"
    net.save_pretrained(str(path))
    transformers.ViTImageProcessor(image_mean=MEAN, image_std=STD, do_resize=False).save_pretrained(str(path))
    return path, net


def test_the_processors_normalization_and_the_weights_give_the_models_logits(saved):
    path, net = saved
    model, info = load_model(f"huggingface:{path}")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), net(pixel_values=(x - 0.3) / 0.2).logits, atol=1e-5)
    assert info["preprocessing"] == {"mean": MEAN, "std": STD, "from": "the huggingface model's own configuration"}
    assert info["labels"] == [f"digit {i}" for i in range(10)] and info["image_processor"]["processor"] == "ViTImageProcessor"


def test_a_suite_on_a_huggingface_model_has_its_known_clean_accuracy_and_class_names(saved, tmp_path):
    """Labels are the model's own predictions under its processor's normalization: clean accuracy is 1."""
    path, net = saved
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(pixel_values=(x - 0.3) / 0.2).logits.argmax(dim=1)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    cfg = {"name": "hf", "device": "cpu", "model": {"source": f"huggingface:{path}", "num_classes": 10},
           "data": {"source": f"npz:{tmp_path / 'd.npz'}"}, "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.1], "steps": 5}]}
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    card = harness.run(str(tmp_path / "hf.yaml"), out=tmp_path / "out", show_progress=False)
    assert card.metrics["clean_accuracy"] == 1.0 and card.metrics["robust_accuracy:pgd-linf@0.1"] < 1.0  # gradients flow
    record = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    assert record["classes"]["names"] == [f"digit {i}" for i in range(10)]
    assert [a["kind"] for a in record["provenance"]["artifacts"] if a["role"] == "model"] == ["tree"]


def test_a_pickled_checkpoint_is_refused_and_never_loaded(saved, tmp_path):
    import shutil

    path = tmp_path / "pickled"
    shutil.copytree(saved[0], path)
    (path / "model.safetensors").unlink()
    torch.save(saved[1].state_dict(), path / "pytorch_model.bin")
    with pytest.raises(BadInput, match=r"holds no model.safetensors \(pytorch_model.bin is a pickle and is never loaded"):
        load_model(f"huggingface:{path}")


def test_a_config_asking_for_its_own_code_is_refused(saved, tmp_path):
    import shutil

    path = tmp_path / "remote"
    shutil.copytree(saved[0], path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForImageClassification": "evil.Model"}}))
    with pytest.raises(BadInput, match="asks for code of its own"):
        load_model(f"huggingface:{path}")


@pytest.mark.parametrize("case, where, words", [
    ("not_a_dir", "nothing-here", "not a Hugging Face model directory"),
    ("classes", "model.num_classes", "has 10 labels, not 3"),
    ("weights", "model.weights", "holds its own weights"),
    ("kwargs", "model.kwargs.hidden_size", "take no kwargs"),
])
def test_bad_huggingface_sources_name_the_file_or_key(saved, tmp_path, case, where, words):
    source = tmp_path / "nothing-here" if case == "not_a_dir" else saved[0]
    kwargs = {"num_classes": 3 if case == "classes" else None, "weights": str(saved[0] / "model.safetensors") if case == "weights" else None,
              "kwargs": {"hidden_size": 8} if case == "kwargs" else None}
    with pytest.raises(BadInput) as e:
        load_model(f"huggingface:{source}", **kwargs)
    assert where in e.value.where and words in str(e.value)
