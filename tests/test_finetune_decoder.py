"""training/finetune_decoder.py: decoder-only fine-tuning of a VAE (encoder frozen), with the
optional edge-weighted loss the bundled VAE was fine-tuned with."""
import pytest
import torch
from safetensors.torch import load_file

from latentloom.training import finetune_decoder
from latentloom.synthetic.shapes import write_dataset
from tests.builders import tiny_vae


def test_pixel_weights_are_one_on_flat_images():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.equal(finetune_decoder.pixel_weights(flat, 10.0).expand(2, 1, 16, 16), torch.ones(2, 1, 16, 16))
    assert float(finetune_decoder.pixel_weights(flat, 0.0)) == 1.0


def test_pixel_weights_mark_pixels_within_one_px_of_an_edge():
    image = torch.full((1, 3, 16, 16), -1.0)
    image[..., 4:12, 4:12] = 1.0  # a white square on black: edges between columns/rows 3|4 and 11|12
    w = finetune_decoder.pixel_weights(image, 10.0)[0, 0]  # (16, 16)
    assert set(w.unique().tolist()) == {1.0, 11.0}
    assert w[8, 8] == 1.0 and w[0, 0] == 1.0  # deep inside, far outside
    assert w[8, 4] == 11.0 and w[8, 3] == 11.0 and w[8, 2] == 11.0  # the edge and 1 px around it
    assert w[8, 1] == 1.0 and w[8, 6] == 1.0


def test_bad_edge_weight_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--edge-weight must be >= 0, got -1.0"):
        finetune_decoder.main(["--vae", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                               "--edge-weight", "-1"])


@pytest.mark.parametrize("edge_weight", ["0", "5"])
def test_only_the_decoder_changes(tmp_path, edge_weight):
    vae_dir, data, out = tmp_path / "vae", tmp_path / "data", tmp_path / "out"
    tiny_vae().save_pretrained(vae_dir, safe_serialization=True)
    write_dataset(data, 4, seed=0)
    rc = finetune_decoder.main(["--vae", str(vae_dir), "--data", str(data), "--output", str(out), "--steps", "2",
                                "--batch-size", "2", "--lr", "1e-2", "--edge-weight", edge_weight])
    assert rc == 0
    before = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert "decoder.conv_out.weight" in changed
