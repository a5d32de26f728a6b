"""IS / FID of text-to-image evaluation (extensions §10.6.4) with a random-weight torchvision Inception loaded from a
file, as a user's weights are: OFA's protocol (299 px, raw [0, 1] input for IS, ImageNet renormalisation and pool3
for FID) checked against an independent numpy/scipy computation, IS of identical images = 1, FID of a set with itself
= 0 and growing with a colour shift, and `evaluate_generated`'s files and clip_score."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import inception_v3

import ofa_scale.evaluation.image_metrics as im
from ofa_scale.errors import UserError
from ofa_scale.evaluation.clip_model import ClipScorer, clip_text
from ofa_scale.evaluation.image_metrics import (Inception, evaluate_generated, feature_statistics,
                                                features_frechet_distance, frechet_distance, inception_scores)

SMALL = 75  # inception_v3's smallest input: the tests run the 299-px protocol's code at 1/16 of the cost


def random_inception() -> torch.nn.Module:
    """torchvision's inception_v3 with seeded random weights whose BatchNorm statistics are calibrated on random
    images (a raw random net's activations explode) and a scaled-down classifier (moderate logits, like real ones)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = inception_v3(weights=None, aux_logits=True, init_weights=True)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # a plain average over the calibration batch
        aux, net.AuxLogits = net.AuxLogits, None  # the auxiliary head needs 299 px; it is unused at eval
        net.train()
        with torch.no_grad():
            net(torch.rand(8, 3, SMALL, SMALL))
        net.AuxLogits = aux
        net.fc.weight.data.mul_(0.02)
    return net.eval()


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception_v3_random.pth"
    torch.save(random_inception().state_dict(), path)
    return path


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(im, "INCEPTION_SIZE", SMALL)


def noise_images(n, seed, size=64, shift=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8))
            for _ in range(n)]


def test_inception_input_is_ofas_299px_unnormalised():
    pixels = im.inception_pixels([Image.new("RGB", (256, 180), (255, 0, 0)), Image.new("L", (40, 40), 0)])
    assert pixels.shape == (2, 3, 299, 299)  # Resize((299, 299)): no crop, aspect not kept
    assert torch.equal(pixels[0, 0], torch.ones(299, 299)) and float(pixels[1].max()) == 0.0  # ToTensor only


@torch.no_grad()
def reference_features(net, images):
    """pool3 of OFA's FID wrapper and IS logits, computed here independently: explicit renormalisation and the
    network's blocks run by hand up to the average pool."""
    x = torch.stack([transforms.ToTensor()(i.convert("RGB").resize((SMALL, SMALL), Image.BILINEAR)) for i in images])
    logits = net(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    y = x * (std / 0.5).view(1, 3, 1, 1) + ((mean - 0.5) / 0.5).view(1, 3, 1, 1)
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]:
        y = getattr(net, name)(y)
    return logits.double().numpy(), y.flatten(1).double().numpy()


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm on 5 images' 2048-d covariance
def test_is_and_fid_match_an_independent_numpy_scipy_computation(inception_path, small, tmp_path):
    generated, reference = noise_images(5, 1), noise_images(6, 2, shift=40)
    net = random_inception()
    logits, gen_pool = reference_features(net, generated)
    _, ref_pool = reference_features(net, reference)
    # OFA's inception_score.py (splits=1) and fid_score.py, in numpy/scipy
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want_is = float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1))))
    mu1, s1 = gen_pool.mean(0), np.cov(gen_pool, rowvar=False)
    mu2, s2 = ref_pool.mean(0), np.cov(ref_pool, rowvar=False)
    want_fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    np.savez(tmp_path / "gt_stat.npz", mu=mu2, sigma=s2)  # OFA's gt_stat.npz format
    got = inception_scores(generated, inception_path, tmp_path / "gt_stat.npz", device="cpu")
    assert want_is > 1.05  # different images: a score that could fail
    assert got["is"] == pytest.approx(want_is, rel=1e-5)
    assert got["fid"] == pytest.approx(want_fid, rel=1e-4)
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(reference):
        image.save(folder / f"{i}.png")
    from_folder = inception_scores(generated, Inception.load(inception_path, "cpu"), folder)
    assert from_folder["fid"] == pytest.approx(want_fid, rel=1e-4)


def test_is_of_identical_images_is_one_and_fid_grows_with_a_shift(inception_path, small):
    inception = Inception.load(inception_path, "cpu")
    same = noise_images(1, 3) * 3
    assert inception_scores(same, inception) == {"is": pytest.approx(1.0, abs=1e-9)}
    base = noise_images(4, 4)
    fids = [inception_scores(noise_images(4, 4, shift=s), inception, base)["fid"] for s in (0, 25, 80)]
    assert abs(fids[0]) < 1e-6 * fids[1] and 0 < fids[1] < fids[2]


def test_frechet_math_equals_scipy_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    for n1, n2, dim in [(50, 80, 16), (6, 9, 32)]:  # full-rank and rank-deficient covariances
        f1, f2 = torch.from_numpy(rng.normal(size=(n1, dim))), torch.from_numpy(rng.normal(1, 2, size=(n2, dim)))
        (mu1, s1), (mu2, s2) = feature_statistics(f1), feature_statistics(f2)
        scipy_fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
        torchmetrics_fid = float(_compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
        assert torchmetrics_fid == pytest.approx(scipy_fid, rel=1e-6)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid, rel=1e-6)
        assert features_frechet_distance(f1, mu2, s2) == pytest.approx(scipy_fid, rel=1e-6)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * scipy_fid


def test_user_errors(inception_path, tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        Inception.load(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not torchvision's inception_v3"):
        Inception.load(tmp_path / "other.pth")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="an .npz with `mu` and `sigma`"):
        im.reference_statistics(tmp_path / "bad.npz", None)
    with pytest.raises(UserError, match="at least 2 images"):
        feature_statistics(torch.zeros(1, 4))
    with pytest.raises(UserError, match="2048"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="needs the Inception weights"):
        evaluate_generated([], tmp_path, None, reference=tmp_path / "gt_stat.npz")


def test_evaluate_generated_ranks_writes_and_scores(inception_path, small, tmp_path):
    clip = ClipScorer.random("tiny", seed=1, device="cpu")
    sets = [("u1", "A red circle.", noise_images(3, 5)), ("u/2", "a blue square", noise_images(2, 6, shift=50))]
    got = evaluate_generated(sets, tmp_path / "eval", clip, inception_weights=inception_path,
                             reference=noise_images(3, 7), device="cpu")
    best = []
    for (uid, caption, images), result in zip(sets, got.results):
        scores = clip.similarities(images, clip_text(caption))
        order = torch.argsort(scores, descending=True).tolist()
        assert result["id"] == uid and len(result["images"]) == len(images)
        for path, i in zip(result["images"], order):  # best first: file k is the k-th most similar image
            with Image.open(path) as written:
                assert np.array_equal(np.asarray(written), np.asarray(images[i]))
        best.append(float(scores.max()))
    assert sorted(p.name for p in got.image_dir.iterdir()) == ["u1_0.png", "u1_1.png", "u1_2.png", "u_2_0.png",
                                                               "u_2_1.png"]
    assert got.metrics["clip_score"] == pytest.approx(np.mean(best), abs=1e-6)
    assert set(got.metrics) == {"clip_score", "is", "fid"} and got.metrics["fid"] > 0
    top1 = [Image.open(r["images"][0]).convert("RGB") for r in got.results]
    assert got.metrics["is"] == pytest.approx(inception_scores(top1, inception_path, device="cpu")["is"])
    with Image.open(got.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.width > sheet.height  # two rows of up to three tiles
    no_inception = evaluate_generated(sets, tmp_path / "eval2", clip)
    assert set(no_inception.metrics) == {"clip_score"}


def test_contact_sheet_grid(tmp_path):
    from ofa_scale.evaluation.contact_sheet import CAPTION_LINES, LINE_HEIGHT, PAD, RankedSheet, write_contact_sheet

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (64, 32), c) for c in colours]  # wide: fitted into the tile, aspect kept
    out = write_contact_sheet(images, [f"caption {i}" for i in range(5)], tmp_path / "sheet.png", tile=32)
    cell_w, cell_h = 32 + 2 * PAD, 32 + 2 * PAD + CAPTION_LINES * LINE_HEIGHT
    with Image.open(out) as sheet:
        assert sheet.size == (3 * cell_w, 2 * cell_h)  # 5 images: the smallest square grid, 3 wide
        for i, colour in enumerate(colours):  # each tile's centre shows its image
            x, y = (i % 3) * cell_w + PAD + 16, (i // 3) * cell_h + PAD + 16
            assert sheet.getpixel((x, y)) == colour
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        write_contact_sheet(images, ["x"] * 4, tmp_path / "bad.png")
    ranked = RankedSheet(max_rows=2, max_columns=2, tile=32)
    for row in range(3):
        ranked.add(f"row {row}", images[:3 - row], ["a", "b", "c"])
    with Image.open(ranked.write(tmp_path / "ranked.png")) as sheet:
        assert sheet.size == (2 * cell_w, 2 * cell_h)  # the first 2 captions, their best 2 images


def test_fid_stats_cli_writes_ofas_gt_stat(inception_path, small, tmp_path, capsys):
    """`ofa-eval fid-stats` = OFA's gt_stat.npz of a folder: mu/sigma of the independently computed pool3 features,
    and FID against the file equals FID against the folder."""
    from ofa_scale.cli.evaluate import main

    reference = noise_images(5, 8, shift=30)
    folder = tmp_path / "ref"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(reference):  # (searched recursively, as the FID folder reference is)
        image.save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "stats" / "gt_stat.npz"
    assert main(["fid-stats", "--images", str(folder), "--inception", str(inception_path), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "5 images" in capsys.readouterr().out
    order = sorted(range(5), key=lambda i: str(folder / ("sub" if i % 2 else "") / f"{i}.png"))
    _, pool = reference_features(random_inception(), [reference[i] for i in order])
    with np.load(out, allow_pickle=False) as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["sigma"].shape == (2048, 2048)
        for got, want in ((f["mu"], pool.mean(0)), (f["sigma"], np.cov(pool, rowvar=False))):
            assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()  # float32 convolutions, batched apart
    assert list(out.parent.iterdir()) == [out]  # no partial file left
    inception = Inception.load(inception_path, "cpu")
    generated = noise_images(3, 9)
    from_file = inception_scores(generated, inception, out)["fid"]
    assert from_file > 0 and from_file == pytest.approx(inception_scores(generated, inception, folder)["fid"],
                                                        rel=1e-6)
    (tmp_path / "empty").mkdir()
    for args, message in [(["--images", str(tmp_path / "nowhere")], "is not a folder"),
                          (["--images", str(tmp_path / "empty")], "holds no .png/.jpg images"),
                          (["--images", str(folder), "--out", str(tmp_path / "gt_stat")], "must end in .npz")]:
        argv = ["fid-stats", "--inception", str(inception_path), "--out", str(out), *args]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
