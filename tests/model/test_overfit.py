"""A small OFA overfits one fixed caption batch from the sample corpus to near-zero loss (learning sanity check)."""

import base64
import io

import torch
from PIL import Image
from torch.nn import functional as F

from ofa_scale.data.sample_corpus import write_sample_corpus
from ofa_scale.data.tokenizer import load_tokenizer
from ofa_scale.model import OFAConfig, OFAModel

PROMPT = " what does the image describe?"
IMAGE_SIZE = 64


def _caption_batch(tmp_path, bpe_dir, n=2):
    paths = write_sample_corpus(tmp_path / "corpus", rows=12, seed=0)
    tok = load_tokenizer("gpt2-bpe", bpe_dir)
    rows = [line.split("\t") for line in paths["vision_language_examples.tsv"].read_text().splitlines()]
    rows = [r for r in rows if r[7] == "caption"][:n]
    assert len(rows) == n
    sources, targets, images = [], [], []
    for r in rows:
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(r[1]))).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().view(IMAGE_SIZE, IMAGE_SIZE, 3)
        images.append((pixels.permute(2, 0, 1) / 255 - 0.5) / 0.5)
        sources.append([tok.bos] + tok.encode(PROMPT) + [tok.eos])
        targets.append(tok.encode(" " + r[2].lower()) + [tok.eos])

    def pad(seqs):
        width = max(map(len, seqs))
        return torch.tensor([s + [tok.pad] * (width - len(s)) for s in seqs])

    target = pad(targets)
    prev = pad([[tok.bos] + t[:-1] for t in targets])
    return dict(src_tokens=pad(sources), patch_images=torch.stack(images),
                patch_masks=torch.ones(n, dtype=torch.bool), prev_output_tokens=prev), target, tok.pad


def test_small_model_overfits_one_caption_batch(tmp_path, bpe_dir):
    torch.manual_seed(0)
    batch, target, pad = _caption_batch(tmp_path, bpe_dir)
    cfg = OFAConfig.preset("ofa_tiny", d_model=128, ffn_dim=256, heads=4, encoder_layers=2, decoder_layers=2)
    model = OFAModel(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=True)
    losses = []
    for _ in range(100):  # ~60 steps suffice
        logits = model(**batch)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), ignore_index=pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.05:
            break
    assert losses[0] > 8.0  # ~ln(59457) at init
    assert losses[-1] < 0.05, losses[-10:]
    # (train mode: BatchNorm uses the batch statistics it was fitted with; dropout/drop-path are 0)
    with torch.no_grad():
        pred = model(**batch).argmax(-1)
    real = target.ne(pad)
    assert torch.equal(pred[real], target[real])
