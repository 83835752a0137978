"""Small models shipped with exprune-fx, for the demo, the tests and the command line.

Each factory returns ``(model, example_inputs)`` with a seeded initialisation, in eval mode,
so that ``exprune-fx dump exprune_fx.zoo:residual_cnn`` works without any other file.

Example:
    >>> from exprune_fx import analyze
    >>> from exprune_fx.zoo import residual_cnn
    >>> model, x = residual_cnn()
    >>> analyze(model, x).summary()["eligible_sites"] > 0
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu (a ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class ResidualCNN(nn.Module):
    """A small ResNet-style CNN for 1x28x28 (Fashion-MNIST sized) images.

    Stem conv, two residual stages separated by a strided transition conv, global average
    pooling and a linear classifier.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, int] = (32, 64), classes: int = 10):
        super().__init__()
        c1, c2 = widths
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c1), nn.ReLU())
        self.stage1 = nn.Sequential(ResidualBlock(c1), ResidualBlock(c1))
        self.transition = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(c2), nn.ReLU())
        self.stage2 = nn.Sequential(ResidualBlock(c2), ResidualBlock(c2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.transition(self.stage1(self.stem(x)))))


class VGGStyle(nn.Module):
    """A VGG-style CNN for 1x28x28 images: two blocks of two 3x3 convs (with or without batch
    norm) and a max-pool each, then a two-layer classifier on the flattened 64x7x7 features."""

    def __init__(self, batch_norm: bool = True, widths: tuple[int, int] = (32, 64), hidden: int = 256,
                 classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            for _ in range(2):
                layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 7 * 7, hidden), nn.ReLU(),
                                        nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def residual_cnn(seed: int = 0, batch: int = 2):
    """The demo model: :class:`ResidualCNN` with randomised batch-norm statistics."""
    _seeded(seed)
    model = ResidualCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics, as after training
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval(), torch.randn(batch, 1, 28, 28)


def mlp(seed: int = 0, widths: tuple[int, ...] = (784, 256, 256, 10), batch: int = 2):
    """A ReLU MLP: Linear-ReLU blocks and a linear head."""
    _seeded(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval(), torch.randn(batch, widths[0])


class GCN(nn.Module):
    """A graph convolutional network written with plain torch ops.

    ``adjacency`` is the normalised adjacency (dense or sparse COO) given as an input.
    Each hidden layer computes ``relu((A @ X) @ W^T + b)``: aggregating before the linear
    layer keeps the linear layer's result directly in front of its ReLU.
    """

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4, layers: int = 3):
        super().__init__()
        widths = [features] + [hidden] * (layers - 1) + [classes]
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.lins):
            x = lin(adjacency @ x)
            if i < len(self.lins) - 1:
                x = torch.relu(x)
        return x


def normalized_adjacency(edges: torch.Tensor, nodes: int, sparse: bool = False) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` for an undirected edge list of shape [2, E]."""
    a = torch.zeros(nodes, nodes)
    a[edges[0], edges[1]] = 1.0
    a[edges[1], edges[0]] = 1.0
    a += torch.eye(nodes)
    d = a.sum(1).rsqrt()
    a = d[:, None] * a * d[None, :]
    return a.to_sparse() if sparse else a


def gcn(seed: int = 0, nodes: int = 12, sparse: bool = False):
    """:class:`GCN` on a random graph with ``nodes`` nodes."""
    _seeded(seed)
    model = GCN().eval()
    edges = torch.randint(0, nodes, (2, 3 * nodes))
    return model, (torch.randn(nodes, 16), normalized_adjacency(edges, nodes, sparse))


class SinusoidalEncoder(nn.Module):
    """A tiny transformer encoder layer whose input is added to a fixed sinusoidal encoding.

    The encoding is a buffer that is not uniform along the model width, so the width cannot
    be permuted: the analysis must pin it.
    """

    def __init__(self, width: int = 16, heads: int = 2, ffn: int = 32, tokens: int = 8):
        super().__init__()
        pos = torch.arange(tokens)[:, None]
        freq = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
        pe = torch.zeros(tokens, width)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pe", pe)
        self.layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x + self.pe)


def sinusoidal_encoder(seed: int = 0, batch: int = 2):
    _seeded(seed)
    return SinusoidalEncoder().eval(), torch.randn(batch, 8, 16)


# -- Hugging Face architectures from small configs (random weights, no download) ---------
HF_VOCAB, HF_TOKENS = 96, 8


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # transformers is in the dev extra, not a core dependency
        raise ImportError("the Hugging Face models need transformers: pip install 'exprune-fx[dev]'") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _token_inputs(batch: int, mask: bool) -> dict:
    ids = torch.randint(0, HF_VOCAB, (batch, HF_TOKENS), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if mask else {"input_ids": ids}


def hf_opt(seed: int = 0, batch: int = 2):
    """OPTForCausalLM (ReLU FFN, learned positions), keyword inputs, use_cache=False."""
    t = _transformers()
    _seeded(seed)
    cfg = t.OPTConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return t.OPTForCausalLM(cfg).eval(), {**_token_inputs(batch, False), "use_cache": False}


def opt_lm_config():
    """The byte-level OPT language model's config (vocab 256, width 128, 2 layers, ReLU FFN 512);
    ``benchmarks/train_lm.py`` trains it on Python sources."""
    t = _transformers()
    return t.OPTConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, ffn_dim=512,
                       num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)


def opt_lm(seed: int = 0):
    """An untrained OPTForCausalLM with :func:`opt_lm_config`, in eval mode."""
    t = _transformers()
    _seeded(seed)
    return t.OPTForCausalLM(opt_lm_config()).eval()


def hf_bert(seed: int = 0, batch: int = 2):
    """BertModel (GELU FFN) with input_ids and attention_mask."""
    t = _transformers()
    _seeded(seed)
    cfg = t.BertConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                       num_attention_heads=4, max_position_embeddings=64)
    return t.BertModel(cfg).eval(), _token_inputs(batch, True)


def hf_gpt2(seed: int = 0, batch: int = 2):
    """GPT2LMHeadModel (tanh-approximated GELU, fused qkv projection), use_cache=False."""
    t = _transformers()
    _seeded(seed)
    cfg = t.GPT2Config(vocab_size=HF_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                       bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(cfg).eval(), {**_token_inputs(batch, False), "use_cache": False}


def hf_resnet(seed: int = 0, batch: int = 1):
    """ResNetForImageClassification (bottleneck blocks, batch norm) on 3x32x32 images."""
    t = _transformers()
    _seeded(seed)
    cfg = t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
    return t.ResNetForImageClassification(cfg).eval(), torch.randn(batch, 3, 32, 32)


def hf_vit(seed: int = 0, batch: int = 1):
    """ViTForImageClassification (GELU FFN, class token, learned positions) on 3x32x32 images."""
    t = _transformers()
    _seeded(seed)
    cfg = t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=5)
    return t.ViTForImageClassification(cfg).eval(), torch.randn(batch, 3, 32, 32)


HF_MODELS = {"opt": hf_opt, "bert": hf_bert, "gpt2": hf_gpt2, "resnet": hf_resnet, "vit": hf_vit}
