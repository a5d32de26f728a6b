"""The CLIP scorer of text-to-image ranking (extensions §10.6.1–2) on random tiny CLIPs: OFA's preprocessing,
cosine = the normalised embeddings' dot product, rank = similarity order, loading OpenAI's TorchScript archive
(fp16, QuickGELU) and open_clip state dicts from local files only, 75-token truncation, and one-sentence errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from ofa_scale.errors import UserError
from ofa_scale.evaluation.clip_model import TINY_CFG, ClipScorer, clip_text, order_by

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.random("tiny", seed=0, device="cpu")


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (300, 200), colour) for colour in ("red", "blue", "green")] + [
        Image.effect_noise((224, 224), 60).convert("RGB")]


def test_preprocessing_is_ofas(scorer, images):
    import open_clip

    ofa = transforms.Compose([  # OFA's models/clip/clip.py _transform(224)
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), lambda im: im.convert("RGB"), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    photo = Image.effect_mandelbrot((320, 240), (-2, -1.2, 1, 1.2), 50).convert("L")  # non-square, not RGB
    assert torch.equal(scorer.preprocess(photo), ofa(photo))
    assert open_clip.get_model_config("ViT-B-16")["vision_cfg"]["image_size"] == 224  # OFA's arch: the same 224
    assert scorer.context_length == 77


def test_cosine_and_rank(scorer, images):
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(im) for im in images[:3]])
        img = F.normalize(scorer.model.encode_image(pixels), dim=-1)
        txt = F.normalize(scorer.model.encode_text(scorer.tokenizer(CAPTIONS)), dim=-1)
    got = scorer.cosine(images[:3], CAPTIONS)
    assert got.shape == (3,) and torch.allclose(got, (img * txt).sum(-1), atol=1e-6)
    sims = scorer.similarities(images, "a red circle")
    assert scorer.rank(images, "a red circle") == sorted(range(4), key=lambda i: -float(sims[i]))
    assert len(set(scorer.rank(images, "a red circle"))) == 4
    assert scorer.rank([images[0]] * 3, "x") == [0, 1, 2]  # ties keep the input order
    assert order_by(torch.tensor([0.1, 0.5, 0.5, -1.0])) == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="pairs image i with text i"):
        scorer.cosine(images, CAPTIONS)


def test_long_captions_are_truncated_to_75_tokens(images):
    scorer = ClipScorer.random("tiny", seed=0, device="cpu")
    long, cut = "red " * 100, "red " * 75  # "red" is one BPE token
    assert torch.equal(scorer.text_features([long]), scorer.text_features([cut])) and scorer.truncated == 1
    assert torch.isfinite(scorer.similarities(images, long)).all()
    assert clip_text("A RED/blue Circle, on the  grass!") == "a red blue circle, on the grass!"


def test_state_dict_files_load_locally(scorer, images, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    import open_clip.pretrained as pretrained
    monkeypatch.setattr(pretrained, "download_pretrained", no_network)
    monkeypatch.setattr(pretrained, "download_pretrained_from_url", no_network)
    monkeypatch.setattr(pretrained, "download_pretrained_from_hf", no_network)
    want = scorer.cosine(images[:3], CAPTIONS)
    torch.save(scorer.model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in scorer.model.state_dict().items()}},
               tmp_path / "wrapped.pt")  # a training checkpoint's layout
    (tmp_path / "tiny.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    for name, arch in (("plain.pt", "tiny"), ("wrapped.pt", str(tmp_path / "tiny.json"))):
        loaded = ClipScorer.load(tmp_path / name, arch, device="cpu")
        assert torch.allclose(loaded.cosine(images[:3], CAPTIONS), want, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # making the archive needs TorchScript
def test_openai_torchscript_archive_loads_with_quickgelu(images, tmp_path):
    """OpenAI's ViT-B-16.pt is a TorchScript archive with fp16 weights, non-weight entries and QuickGELU."""
    from open_clip.model import CLIP
    from open_clip.transformer import QuickGELU

    gelu_cfg = {**TINY_CFG, "quick_gelu": False}
    torch.manual_seed(3)
    model = CLIP(**gelu_cfg).half()
    # OpenAI's archive also lists input_resolution, context_length and vocab_size (the last two are plain
    # attributes of open_clip's CLIP, so only the first can be added here; all three are dropped the same way)
    model.register_buffer("input_resolution", torch.tensor(224))
    torch.jit.save(torch.jit.script(model), str(tmp_path / "ViT-tiny.pt"))
    loaded = ClipScorer.load(tmp_path / "ViT-tiny.pt", gelu_cfg, device="cpu")
    assert isinstance(loaded.model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # OpenAI's activation
    assert loaded.model.token_embedding.weight.dtype == torch.float32
    assert torch.equal(loaded.model.token_embedding.weight, model.token_embedding.weight.float())
    assert torch.isfinite(loaded.cosine(images[:3], CAPTIONS)).all()


def test_errors_are_one_sentence(scorer, tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        ClipScorer.load(tmp_path / "ViT-B-16.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read CLIP weights"):
        ClipScorer.load(tmp_path / "junk.pt", "tiny")
    torch.save(scorer.model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(UserError, match="do not fit architecture .*ViT-B-16.*of another shape"):
        ClipScorer.load(tmp_path / "tiny.pt", "ViT-B-16")
    with pytest.raises(UserError, match="unknown CLIP architecture"):
        ClipScorer.load(tmp_path / "tiny.pt", "ViT-Q-99")
    with pytest.raises(UserError, match="not an OpenAI-style CLIP"):
        ClipScorer.load(tmp_path / "tiny.pt", "ViT-B-16-SigLIP")
