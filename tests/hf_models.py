"""Small Hugging Face models for the tests (skipped when transformers is missing)."""

import pytest

pytest.importorskip("transformers")

from exprune_fx.zoo import HF_MODELS as ALL  # noqa: E402

opt, bert, gpt2, resnet, vit = (ALL[k] for k in ("opt", "bert", "gpt2", "resnet", "vit"))
