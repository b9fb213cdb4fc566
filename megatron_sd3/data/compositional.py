"""The compositional text-to-latent task (``--mock-task compositional``): a caption in words, two
objects to place, and colour x shape pairs the training data never shows.

A scene holds two objects in two of the four quadrants of the latent (the others empty). An
object is a colour (a signature over the latent channels: ``PRESENCE`` times the all-ones row of a
Sylvester Hadamard matrix, which every object shares as luminance, plus another row of it, so the
four colours are orthogonal beyond what they share) times a shape (a spatial template of the
quadrant: square, disk, cross, ring); a latent is the scene rendered plus Gaussian noise of std
``NOISE``. The
caption names both objects in reading order of their quadrants::

    a red disk at top left and a blue cross at bottom right

It is tokenised by a word-level ``tokenizers.Tokenizer`` over the task's words, padded to the
model's text length, and embedded by a frozen text encoder: ``transformers``' T5 encoder of
width ``ENCODER_WIDTH``, initialised once from ``ENCODER_SEED`` and never trained, whose token
outputs are projected to the model's text width (``prompt_embeds``) and whose whole output
sequence is projected to the pooled width (``pooled_prompt_embeds``: one vector that summarises
the caption in order, as CLIP's pooled embedding does; a mean over the words would be a bag of
them), both projections fixed Gaussian matrices. The encoder runs once per task, on every caption there is, in float64
on one thread (the same numbers in every process), and is then dropped.

``HELD_OUT`` colour x shape pairs (one per colour and one per shape) never appear in a training
sample; each colour and each shape does, with the other shapes and colours. Sample ``i`` is a
function of ``(seed, i)`` only (:func:`megatron_sd3.data._seeding.generator`), like every mock
sample. :meth:`CompositionalTask.judge` decodes each quadrant of a latent to empty or a
(colour, shape) by the nearest rendered template, independently of any model
(``tools/judge_compositional.py``). ``docs/design.md``, section "The compositional task".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from megatron_sd3.data._seeding import generator

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "disk", "cross", "ring")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
#: (colour, shape) pairs no training sample holds: red disk, green cross, blue ring, yellow square
HELD_OUT = frozenset((c, (c + 1) % len(SHAPES)) for c in range(len(COLOURS)))
OBJECTS = tuple(itertools.product(range(len(COLOURS)), range(len(SHAPES))))
SEEN = tuple(o for o in OBJECTS if o not in HELD_OUT)
QUADRANT_PAIRS = tuple(itertools.combinations(range(len(QUADRANTS)), 2))
NOISE = 0.1
PRESENCE = 0.7
ENCODER_SEED = 20_240_611
ENCODER_WIDTH = 64
CAPTION_WORDS = 13
VOCAB = ("<pad>", "<unk>", "a", "and", "at", "top", "bottom", "left", "right", *COLOURS, *SHAPES)


@dataclass(frozen=True)
class Scene:
    """Two objects ``(colour, shape)`` in quadrants ``quadrants[0] < quadrants[1]``."""

    quadrants: tuple[int, int]
    objects: tuple[tuple[int, int], tuple[int, int]]

    def caption(self) -> str:
        return " and ".join(f"a {COLOURS[c]} {SHAPES[s]} at {QUADRANTS[q]}"
                            for q, (c, s) in zip(self.quadrants, self.objects))

    @property
    def held_out(self) -> bool:
        return any(o in HELD_OUT for o in self.objects)

    def index(self) -> int:
        """Position in :func:`all_scenes` (the row of the encoded caption tables)."""
        n = len(OBJECTS)
        return (QUADRANT_PAIRS.index(self.quadrants) * n + OBJECTS.index(self.objects[0])) * n + \
            OBJECTS.index(self.objects[1])


def all_scenes() -> list[Scene]:
    return [Scene(q, (a, b)) for q in QUADRANT_PAIRS for a in OBJECTS for b in OBJECTS]


def colour_signatures(channels: int) -> torch.Tensor:
    """``[len(COLOURS), channels]``: ``PRESENCE`` times row 0 of the Sylvester Hadamard matrix (all
    ones: what every object shares, as luminance) plus row ``1 + colour`` (orthogonal to it and to
    each other, +-1)."""
    if channels < len(COLOURS) + 1 or channels & (channels - 1):
        raise ValueError(f"the compositional task needs a power-of-two number of latent channels >= "
                         f"{len(COLOURS) + 1} (one orthogonal signature per colour), got {channels}")
    h = torch.ones(1, 1)
    while h.shape[0] < channels:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return PRESENCE * h[0] + h[1:1 + len(COLOURS)]


def shape_templates(n: int, m: int) -> torch.Tensor:
    """``[len(SHAPES), n, m]`` masks in {0, 1} of an ``n x m`` quadrant (pixel centres in [-1, 1])."""
    v = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m * 2 - 1
    v, u = torch.meshgrid(v, u, indexing="ij")
    r = (u * u + v * v).sqrt()
    out = torch.stack([
        (u.abs() <= 0.75) & (v.abs() <= 0.75),                                   # square
        r <= 0.7,                                                               # disk
        ((u.abs() <= 0.25) | (v.abs() <= 0.25)) & (u.abs() <= 0.9) & (v.abs() <= 0.9),  # cross
        (r >= 0.55) & (r <= 0.95),                                              # ring
    ]).float()
    return out


def _quadrant_slices(q: int, h: int, w: int) -> tuple[slice, slice]:
    rows = slice(0, h // 2) if q < 2 else slice(h // 2, h)
    cols = slice(0, w // 2) if q % 2 == 0 else slice(w // 2, w)
    return rows, cols


class CompositionalTask:
    """The task's renderer, caption encoder and judge for latents of ``channels`` channels and
    text of ``text_len`` tokens of width ``text_dim`` (pooled ``pooled_dim``)."""

    def __init__(self, channels: int, text_len: int, text_dim: int, pooled_dim: int):
        if text_len < CAPTION_WORDS:
            raise ValueError(f"the compositional task's captions are {CAPTION_WORDS} words; the model's "
                             f"text length is {text_len}")
        self.channels, self.text_len, self.text_dim, self.pooled_dim = int(channels), int(text_len), \
            int(text_dim), int(pooled_dim)
        self.signatures = colour_signatures(self.channels)
        self.scenes = all_scenes()
        self._encoded = None
        self._templates: dict = {}

    @property
    def text(self) -> torch.Tensor:
        """``[len(scenes), text_len, text_dim]``: every caption's embedding (encoded at first use)."""
        return self._encode()[0]

    @property
    def pooled(self) -> torch.Tensor:
        """``[len(scenes), pooled_dim]``: every caption's pooled embedding."""
        return self._encode()[1]

    def _encode(self):
        if self._encoded is None:
            self._encoded = encode_captions([s.caption() for s in self.scenes], self.text_len, self.text_dim,
                                            self.pooled_dim)
        return self._encoded

    # -- data ------------------------------------------------------------------------------------
    def draw(self, g: torch.Generator, pool=SEEN) -> Scene:
        q = QUADRANT_PAIRS[int(torch.randint(len(QUADRANT_PAIRS), (), generator=g))]
        a, b = (pool[int(i)] for i in torch.randint(len(pool), (2,), generator=g))
        return Scene(q, (a, b))

    def draw_held_out(self, g: torch.Generator) -> Scene:
        """A scene with one held-out pair (in either slot) and one seen pair."""
        s, held = self.draw(g), sorted(HELD_OUT)
        new = held[int(torch.randint(len(held), (), generator=g))]
        slot = int(torch.randint(2, (), generator=g))
        return Scene(s.quadrants, (new, s.objects[1]) if slot == 0 else (s.objects[0], new))

    def render(self, scene: Scene, h: int, w: int) -> torch.Tensor:
        """``[C, h, w]``: the scene's clean latent."""
        if h % 2 or w % 2 or h < 8 or w < 8:
            raise ValueError(f"the compositional task needs even latent sides of at least 8, got {h}x{w}")
        shapes = self.templates(h // 2, w // 2)
        out = torch.zeros(self.channels, h, w)
        for q, (c, s) in zip(scene.quadrants, scene.objects):
            rows, cols = _quadrant_slices(q, h, w)
            out[:, rows, cols] = self.signatures[c][:, None, None] * shapes[s]
        return out

    def sample(self, g: torch.Generator, h: int, w: int) -> tuple[dict, Scene]:
        """One training sample (seen pairs only) from ``g``, and its scene."""
        scene = self.draw(g)
        k = scene.index()
        latents = self.render(scene, h, w) + NOISE * torch.randn(self.channels, h, w, generator=g)
        return {"latents": latents, "prompt_embeds": self.text[k].clone(),
                "pooled_prompt_embeds": self.pooled[k].clone()}, scene

    def prompts(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
        """``n`` scenes of seen pairs, then ``n`` with one held-out pair (the other seen), fixed by
        ``seed``: ``(prompt_embeds [2n, T, D], pooled [2n, P], scenes)``."""
        g = generator(seed, "compositional-prompts")
        scenes = [self.draw(g) for _ in range(n)] + [self.draw_held_out(g) for _ in range(n)]
        idx = torch.tensor([s.index() for s in scenes])
        return self.text[idx].contiguous(), self.pooled[idx].contiguous(), scenes

    # -- the judge -------------------------------------------------------------------------------
    def templates(self, n: int, m: int) -> torch.Tensor:
        key = (n, m)
        if key not in self._templates:
            self._templates[key] = shape_templates(n, m)
        return self._templates[key]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, 4]``: each quadrant of ``[N, C, h, w]`` latents decoded to the nearest of empty
        (-1) and every rendered object (``colour * len(SHAPES) + shape``), by squared distance."""
        lat = latents.detach().float().cpu()
        n_, c_, h, w = lat.shape
        if c_ != self.channels:
            raise ValueError(f"latents have {c_} channels; the task's have {self.channels}")
        shapes = self.templates(h // 2, w // 2)
        cands = torch.cat([torch.zeros(1, c_, h // 2, w // 2),
                           (self.signatures[:, None, :, None, None] * shapes[None, :, None]).flatten(0, 1)])
        out = torch.empty(n_, len(QUADRANTS), dtype=torch.long)
        for q in range(len(QUADRANTS)):
            rows, cols = _quadrant_slices(q, h, w)
            block = lat[:, :, rows, cols].flatten(1)
            d = torch.cdist(block, cands.flatten(1))
            out[:, q] = d.argmin(1) - 1
        return out

    def judge(self, latents: torch.Tensor, scenes: list[Scene]) -> dict:
        """Whether each latent follows its scene's caption (``follows``: both objects decoded
        right and the other quadrants empty), and the shares: all, seen and held-out scenes, and
        per object its position (its quadrant not empty), colour and shape."""
        dec = self.decode(latents)
        follows, pos, col, shp = [], [], [], []
        for row, scene in zip(dec.tolist(), scenes):
            want = [-1] * len(QUADRANTS)
            for q, (c, s) in zip(scene.quadrants, scene.objects):
                want[q] = c * len(SHAPES) + s
                got = row[q]
                pos.append(got >= 0)
                col.append(got >= 0 and got // len(SHAPES) == c)
                shp.append(got >= 0 and got % len(SHAPES) == s)
            follows.append(row == want)
        follows_t = torch.tensor(follows)
        held = torch.tensor([s.held_out for s in scenes])

        def share(mask):
            return float(follows_t[mask].float().mean()) if bool(mask.any()) else float("nan")

        return {"follows": follows_t, "following": float(follows_t.float().mean()),
                "following_seen": share(~held), "following_held_out": share(held),
                "position": sum(pos) / len(pos), "colour": sum(col) / len(col), "shape": sum(shp) / len(shp)}

    @staticmethod
    def chance() -> float:
        """The share of samples that follow a caption drawn at random from the training scenes
        (a latent matches one scene): the sum of the scenes' squared probabilities."""
        return 1.0 / (len(QUADRANT_PAIRS) * len(SEEN) ** 2)


def tokenizer(text_len: int):
    """A word-level ``tokenizers.Tokenizer`` over ``VOCAB``, padding to ``text_len``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=text_len)
    tok.enable_truncation(max_length=text_len)
    return tok


def encode_captions(captions: list[str], text_len: int, text_dim: int, pooled_dim: int):
    """``(prompt_embeds [N, text_len, text_dim], pooled [N, pooled_dim])`` in fp32 from the frozen
    T5 encoder (float64 on one thread: every process computes the same bits)."""
    from transformers import T5Config, T5EncoderModel

    enc = tokenizer(text_len).encode_batch(captions)
    ids = torch.tensor([e.ids for e in enc])
    words = torch.tensor([e.attention_mask for e in enc], dtype=torch.float64)
    if bool((ids == VOCAB.index("<unk>")).any()):
        raise ValueError("a caption holds a word outside the task's vocabulary")
    cfg = T5Config(vocab_size=len(VOCAB), d_model=ENCODER_WIDTH, d_kv=ENCODER_WIDTH // 4, d_ff=2 * ENCODER_WIDTH,
                   num_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ENCODER_SEED)
        model = T5EncoderModel(cfg).double().eval()
        proj_t = torch.randn(ENCODER_WIDTH, text_dim, dtype=torch.float64) / ENCODER_WIDTH ** 0.5
        proj_p = torch.randn(text_len * ENCODER_WIDTH, pooled_dim, dtype=torch.float64) / (text_len * ENCODER_WIDTH) ** 0.5
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state
    finally:
        torch.set_num_threads(threads)
    return (hidden @ proj_t).float(), (hidden.flatten(1) @ proj_p).float()
