"""GradCAM attention for every image of a split, reduced at once to what SLIM keeps.

For each image, GradCAM (the `grad-cam` package) on the model's last conv block for the
*ground-truth* class gives the image-size map used for AIOU and overlays. From the same
forward/backward pass (the activations A and gradients grad-cam captured) we form the
un-normalised low-resolution CAM ``s = ReLU(sum_c mean_uv(dy/dA_c) * A_c)`` and the two
attention vectors of ALGORITHMS.md:

* ``v    = sum_uv A[:, u, v] * s[u, v]``                (attention-weighted feature)
* ``vbar = sum_uv A[:, u, v] * (1 - minmax(s)[u, v])``  (background-weighted feature)

Activations (C x h x w per image) are reduced to these two C-vectors straight away, so a
split of ResNet-50 maps never has to be held in memory.

grad-cam is imported by the functions that run it: it pulls in torchvision and OpenCV (~4 s
on 2 cores), and every sweep reads SLIM's parameters to validate its file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from debias.bars import bars_disabled
from debias.data import GroupedDataset, make_torch_dataset
from debias.models import Classifier, cam_layer
from debias.slim.aiou import DEFAULT_DELTA, aiou_batch, minmax_batch, soft_iou_batch

if TYPE_CHECKING:
    from pytorch_grad_cam import GradCAM


__all__ = ["attention_vectors", "compute_attention", "gradcam_images", "lowres_cam",
           "overlay_png"]


def lowres_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """GradCAM before any scaling: ReLU of the gradient-weighted channel sum, (N, h, w)."""
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1))


def attention_vectors(activations: torch.Tensor, s: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, vbar), each (N, C), from activations (N, C, h, w) and low-res CAMs s (N, h, w).

    vbar weights each location by 1 - minmax(s); a flat s (no attention anywhere) thus
    counts the whole map as background.
    """
    if activations.ndim != 4 or s.shape != (activations.shape[0], *activations.shape[2:]):
        raise ValueError(f"activations (N, C, h, w) and CAMs (N, h, w) do not match: "
                         f"{tuple(activations.shape)} vs {tuple(s.shape)}")
    a = activations.double()
    s64 = s.double()
    scaled = torch.from_numpy(minmax_batch(s64.numpy(force=True))).to(a.device)
    v = torch.einsum("nchw,nhw->nc", a, s64)
    v_bar = torch.einsum("nchw,nhw->nc", a, 1.0 - scaled)
    return v.float(), v_bar.float()


def gradcam_images(model: Classifier, images: torch.Tensor, targets: Sequence[int],
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """GradCAM for one batch: image-size maps in [0, 1] (grad-cam's), low-res CAMs, v, vbar.

    The input is marked as requiring grad so the backward pass reaches the CAM layer even
    when the model's parameters are frozen. The model is left in eval mode with no grads.
    """
    from pytorch_grad_cam import GradCAM

    model.eval()
    with GradCAM(model=model, target_layers=[cam_layer(model)]) as tool:
        return _gradcam_batch(tool, images, targets, device)


def _gradcam_batch(tool: GradCAM, images: torch.Tensor, targets: Sequence[int],
                   device: torch.device | str) -> dict[str, torch.Tensor]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images.to(device).requires_grad_(True)
    cam = tool(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    acts = tool.activations_and_grads.activations[0].float()
    grads = tool.activations_and_grads.gradients[0].float()
    s = lowres_cam(acts, grads)
    v, v_bar = attention_vectors(acts, s)
    tool.model.zero_grad(set_to_none=True)
    return {"cam": torch.from_numpy(np.asarray(cam, dtype=np.float32)), "cam_lowres": s,
            "v": v, "v_bar": v_bar}


def compute_attention(model: Classifier, data: GroupedDataset, split: str,
                      device: torch.device | str, batch_size: int = 64, keep_cams: bool = True,
                      delta: float = DEFAULT_DELTA) -> dict[str, torch.Tensor]:
    """GradCAM for the ground-truth class of every image of ``split``, in split order.

    Returns ``v``, ``v_bar`` (N, C) float32, ``cam_lowres`` (N, h, w) float32, and
    ``aiou``/``soft_iou`` (N,) computed per batch on the full-precision image-size maps when
    the dataset has foreground masks (NaN otherwise: unknown, never guessed). With
    ``keep_cams`` the image-size maps are kept too, as float16 (N, H, W): at 224 px they are
    100 KB per image, which is why callers that only need a few overlays pass False.
    """
    from pytorch_grad_cam import GradCAM

    view = data.view(split)
    loader = DataLoader(make_torch_dataset(data, split, train=False), batch_size=batch_size,
                        shuffle=False)
    n = len(view)
    out: dict[str, list[torch.Tensor]] = {"v": [], "v_bar": [], "cam_lowres": [], "cam": [],
                                          "aiou": [], "soft_iou": []}
    was_training = model.training
    model.eval()
    try:
        with GradCAM(model=model, target_layers=[cam_layer(model)]) as tool:
            for images, positions in tqdm(loader, desc=f"GradCAM ({split})", leave=False,
                                              disable=bars_disabled()):
                pos = positions.numpy()
                batch = _gradcam_batch(tool, images, view.y[pos], device)
                for key in ("v", "v_bar", "cam_lowres"):
                    out[key].append(batch[key].cpu())
                if keep_cams:
                    out["cam"].append(batch["cam"].half())
                if data.masks is not None:
                    masks = np.asarray(data.masks[view.index[pos]])
                    cams = batch["cam"].numpy()
                    out["aiou"].append(torch.from_numpy(aiou_batch(cams, masks, delta)).float())
                    out["soft_iou"].append(torch.from_numpy(soft_iou_batch(cams, masks)).float())
    finally:
        model.train(was_training)
    result = {k: torch.cat(out[k]) for k in ("v", "v_bar", "cam_lowres")}
    if keep_cams:
        result["cam"] = torch.cat(out["cam"])
    for key in ("aiou", "soft_iou"):
        result[key] = torch.cat(out[key]) if out[key] else torch.full((n,), float("nan"))
    return result


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    return img.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else img


def overlay_png(image_uint8: np.ndarray, cam: np.ndarray, path: str | Path,
                delta: float = DEFAULT_DELTA, min_size: int = 160) -> Path:
    """Write what an annotator looks at: image | GradCAM overlay | CAM thresholded at delta.

    The CAM is min-max normalised (a copy) and must be at image size; small images are
    enlarged (nearest neighbour) to at least ``min_size`` pixels so they can be judged.
    """
    img = np.asarray(image_uint8)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {img.dtype} {img.shape}")
    heat = minmax_batch(np.asarray(cam, dtype=np.float64)[None])[0].astype(np.float32)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"CAM {heat.shape} is not at image size {img.shape[:2]}")
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = img.astype(np.float32) / 255.0
    overlay = show_cam_on_image(rgb, heat, use_rgb=True)
    dim = np.where(heat[..., None] >= delta, 1.0, 0.25)
    thresholded = np.rint(img * dim).astype(np.uint8)
    factor = max(1, -(-min_size // max(1, img.shape[0])))
    panels = [_upscale(p, factor) for p in (img, overlay, thresholded)]
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    sheet = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
