"""The weighted ControlNet preprocessors that run when their annotator file is in the library's annotators/ folder:
nets with seeded random weights in the real files' key layouts (lllyasviel/Annotators' ControlNetHED.pth,
sk_model.pth, sk_model2.pth, netG.pth, body_pose_model.pth) saved under their real names, run through the public code
(``find``, ``detect``, ``control_map``, ``/controlnet/detect``). Each map has the picture's size, 3 channels, uint8,
and is the same twice; its numbers equal an independent computation (torch.nn.functional straight from the file's
tensors, by the reference implementations' names) of the extension's pre- and post-processing; openpose finds and
draws a known skeleton from the maps a perfect net gives. Without the file, the one-line message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from brushwork import InvalidRequest
from brushwork.errors import ModelError
from brushwork.request import ControlUnit

MAP = 64  # processor_res: the smallest the extension's slider has


def picture(seed: int = 0, width: int = 80, height: int = 64) -> Image.Image:
    """Blocks of colour; 5:4 so that processor_res 64 gives 80x64, padded to 128x64 (the padding is cropped)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))


def save(tmp_path, name: str, model) -> None:
    folder = tmp_path / "annotators" / "kind"  # sub-folders are searched, as the extension's downloads/<kind>/
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / name)


def padded(image: Image.Image):
    from brushwork.engine import preprocessors

    return preprocessors.resize_with_pad(preprocessors.hwc3(image), MAP)


def assert_map(ours, size=(64, 80)):
    assert ours.dtype == np.uint8 and ours.shape == (*size, 3)
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 1] == ours[..., 2]).all()


def needs_the_file(name: str, file: str, tmp_path):
    from brushwork.engine import preprocessors

    found = preprocessors.find(name, tmp_path)
    assert found.run is None and not found.model_free
    with pytest.raises(InvalidRequest, match=f"needs model weights .*{file}.*lllyasviel.*annotators"):
        preprocessors.detect(found, picture(), MAP)


# ---- independent computations from the files' tensors -----------------------------------------------------------


def hed_reference(sd: dict, img) -> np.ndarray:
    """ControlNetHED_Apache2 with functional ops; torch's bilinear upsampling (cv2's INTER_LINEAR, the same maths)."""
    h = torch.from_numpy(img).float().permute(2, 0, 1)[None] - sd["norm"]
    projections = []
    for i in range(1, 6):
        if i > 1:
            h = F.max_pool2d(h, 2)
        j = 0
        while f"block{i}.convs.{j}.weight" in sd:
            h = F.relu(F.conv2d(h, sd[f"block{i}.convs.{j}.weight"], sd[f"block{i}.convs.{j}.bias"], padding=1))
            j += 1
        p = F.conv2d(h, sd[f"block{i}.projection.weight"], sd[f"block{i}.projection.bias"])
        projections.append(F.interpolate(p, size=img.shape[:2], mode="bilinear", align_corners=False))
    return torch.sigmoid(torch.cat(projections, 1).mean(1))[0].double().numpy()


def lineart_reference(sd: dict, img) -> np.ndarray:
    """informative-drawings' Generator (3 residual blocks) with functional ops: x / 255 in, the sigmoid out."""
    def conv(x, key, pad=0, stride=1):
        if pad:
            x = F.pad(x, (pad,) * 4, mode="reflect")
        return F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=stride)

    def up(x, key):
        return F.relu(F.instance_norm(F.conv_transpose2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2,
                                                         padding=1, output_padding=1)))

    x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 255.0
    x = F.relu(F.instance_norm(conv(x, "model0.1", pad=3)))
    x = F.relu(F.instance_norm(F.conv2d(x, sd["model1.0.weight"], sd["model1.0.bias"], stride=2, padding=1)))
    x = F.relu(F.instance_norm(F.conv2d(x, sd["model1.3.weight"], sd["model1.3.bias"], stride=2, padding=1)))
    for b in range(3):
        r = F.relu(F.instance_norm(conv(x, f"model2.{b}.conv_block.1", pad=1)))
        x = x + F.instance_norm(conv(r, f"model2.{b}.conv_block.5", pad=1))
    x = up(up(x, "model3.0"), "model3.3")
    return torch.sigmoid(conv(x, "model4.1", pad=3))[0, 0].numpy()


def unet_reference(sd: dict, x, prefix: str = "model.model.", outermost: bool = True):
    """pix2pix's UnetSkipConnectionBlock, recursively (its in-place LeakyReLU makes the skip the activated input)."""
    def down(h, key):
        return F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=1)

    def up(h, key):
        return F.conv_transpose2d(F.relu(h), sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2, padding=1)

    if outermost:
        return torch.tanh(up(unet_reference(sd, down(x, prefix + "0"), prefix + "1.model.", False), prefix + "3"))
    x = F.leaky_relu(x, 0.2)
    if f"{prefix}3.weight" in sd and sd[f"{prefix}3.weight"].ndim == 4:  # innermost: down, up
        return torch.cat([x, F.instance_norm(up(down(x, prefix + "1"), prefix + "3"))], 1)
    inner = unet_reference(sd, F.instance_norm(down(x, prefix + "1")), prefix + "3.model.", False)
    return torch.cat([x, F.instance_norm(up(inner, prefix + "5"))], 1)


# ---- the tests ------------------------------------------------------------------------------------------------


def test_softedge_hed_runs_controlnethed_pth(tmp_path):
    """ControlNetHED.pth (block{1..5}.convs.*, .projection, norm: 37 tensors, 14.7 M weights as the real one's):
    sigmoid(mean of the 5 projections) * 255 at processor_res; softedge_hedsafe is its 0 / 127 / 255 steps."""
    from brushwork.engine import annotators, preprocessors

    needs_the_file("softedge_hed", "ControlNetHED.pth", tmp_path)
    torch.manual_seed(0)
    net = annotators.ControlNetHED()
    with torch.no_grad():
        net.norm.copy_(torch.tensor([122.7, 116.7, 104.0]).view(1, 3, 1, 1))
    sd = net.state_dict()
    assert len(sd) == 37 and sum(v.numel() for v in sd.values()) == 14_716_168
    save(tmp_path, "ControlNetHED.pth", net)

    found = preprocessors.find("hed", tmp_path)
    assert found.name == "softedge_hed" and found.run is not None
    ours = preprocessors.detect(found, picture(), MAP)
    assert_map(ours)
    assert np.array_equal(ours, preprocessors.detect(preprocessors.find("softedge_hed", tmp_path), picture(), MAP))
    img, remove_pad = padded(picture())
    expected = remove_pad(hed_reference(sd, img) * 255.0)
    assert np.abs(ours[..., 0] - expected).max() <= 1.0 and ours.std() > 1  # not a flat map

    safe = preprocessors.detect(preprocessors.find("softedge_hedsafe", tmp_path), picture(), MAP)[..., 0]
    assert set(np.unique(safe)) <= {0, 127, 255} and len(np.unique(safe)) > 1
    soft = ours[..., 0]  # floor(edge * 255): 2/3 is 170, 1/3 is 85
    assert np.array_equal(safe, np.where(soft >= 170, 255, np.where(soft >= 85, 127, 0)))
    fitted = preprocessors.control_map(ControlUnit(model="x", module="softedge_hed", processor_res=MAP).validate(),
                                       picture(), 32, 32, tmp_path)
    assert fitted.size == (32, 32) and fitted.mode == "RGB"


@pytest.mark.parametrize("module, file", [("lineart_realistic", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")])
def test_lineart_runs_the_informative_drawings_generator(tmp_path, module, file):
    """sk_model.pth / sk_model2.pth (model0..model4, 24 tensors, 4.29 M weights): x / 255 in, the sigmoid * 255
    out, inverted (white lines on black) as the extension does."""
    from brushwork.engine import annotators, preprocessors

    needs_the_file(module, file, tmp_path)
    torch.manual_seed(1)
    net = annotators.LineartGenerator()
    sd = net.state_dict()
    assert len(sd) == 24 and sum(v.numel() for v in sd.values()) == 4_290_945
    save(tmp_path, file, net)

    found = preprocessors.find(module, tmp_path)
    ours = preprocessors.detect(found, picture(2), MAP)
    assert_map(ours)
    assert np.array_equal(ours, preprocessors.detect(found, picture(2), MAP))
    img, remove_pad = padded(picture(2))
    expected = 255 - remove_pad((lineart_reference(sd, img) * 255.0).clip(0, 255).astype(np.uint8))
    assert np.abs(ours[..., 0].astype(int) - expected.astype(int)).max() <= 1 and ours.std() > 1
    other = "lineart_coarse" if module == "lineart_realistic" else "lineart_realistic"
    assert preprocessors.find(other, tmp_path).run is None  # its own file


def test_lineart_anime_runs_the_unet_generator(tmp_path):
    """netG.pth: pix2pix's 8-level UNet (model.model.0 ... , 32 tensors; 54.4 M weights at the real width 64, a
    narrow one here), with DataParallel's 'module.' prefixes (the extension strips them): at multiples of 256,
    x / 127.5 - 1 in, y * 127.5 + 127.5 out, resized back (cubic), inverted."""
    import cv2

    from brushwork.engine import annotators, preprocessors

    real = annotators.UnetGenerator().state_dict()
    assert len(real) == 32 and sum(v.numel() for v in real.values()) == 54_405_505
    assert tuple(real["model.model.0.weight"].shape) == (64, 3, 4, 4)
    needs_the_file("lineart_anime", "netG.pth", tmp_path)
    torch.manual_seed(2)
    net = annotators.UnetGenerator(channels=8)
    sd = net.state_dict()
    assert list(sd) == list(real)  # the real width's keys
    (tmp_path / "annotators").mkdir()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "annotators" / "netG.pth")

    found = preprocessors.find("lineart_anime", tmp_path)
    ours = preprocessors.detect(found, picture(3), MAP)
    assert_map(ours)
    assert np.array_equal(ours, preprocessors.detect(found, picture(3), MAP))
    img, remove_pad = padded(picture(3))  # 128 x 64, run at 256 x 256
    x = torch.from_numpy(cv2.resize(img, (256, 256), interpolation=cv2.INTER_CUBIC)).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        y = unet_reference(sd, x / 127.5 - 1.0)[0, 0].numpy() * 127.5 + 127.5
    line = cv2.resize(y, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    expected = 255 - remove_pad(line)
    assert np.abs(ours[..., 0].astype(int) - expected.astype(int)).max() <= 1 and ours.std() > 1


def test_an_annotator_is_loaded_once_and_a_wrong_file_is_one_line(tmp_path):
    from brushwork.engine import annotators, preprocessors

    torch.manual_seed(3)
    save(tmp_path, "sk_model.pth", annotators.LineartGenerator(channels=8))
    path = preprocessors.annotator_file(preprocessors.find("lineart"), tmp_path)
    first = preprocessors.annotator_model(path, annotators.build_lineart, "a lineart Generator")
    assert preprocessors.annotator_model(path, annotators.build_lineart, "a lineart Generator") is first
    save(tmp_path, "ControlNetHED.pth", annotators.LineartGenerator(channels=8))  # another kind under HED's name
    with pytest.raises(ModelError, match=r"ControlNetHED.pth is not lllyasviel's ControlNetHED .*huggingface"):
        preprocessors.detect(preprocessors.find("softedge_hed", tmp_path), picture(), MAP)


# ---- openpose ---------------------------------------------------------------------------------------------------

# the original's layers without a ReLU (stage 6's L1 is named twice and its L2 not at all: its heatmaps are ReLU'd)
NO_RELU = {"conv5_5_CPM_L1", "conv5_5_CPM_L2", "Mconv7_stage2_L1", "Mconv7_stage2_L2", "Mconv7_stage3_L1",
           "Mconv7_stage3_L2", "Mconv7_stage4_L1", "Mconv7_stage4_L2", "Mconv7_stage5_L1", "Mconv7_stage5_L2",
           "Mconv7_stage6_L1"}
POOL = ("pool", 0, 0, 0)
BACKBONE = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), POOL, ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
            POOL, ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
            ("conv3_4", 256, 256, 3), POOL, ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
            ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]


def pose_layers(div: int = 1) -> dict:
    """body_pose_model.pth's layers (name, in, out, kernel), from the original's table: "backbone", then (stage,
    branch) for stages 1-6, branch 1 the PAFs and 2 the heatmaps; the hidden widths divided by ``div`` (the 38 PAF and
    19 heatmap channels kept)."""
    layers = {"backbone": [(n, i if i == 3 else i // div, o // div, k) for n, i, o, k in BACKBONE]}
    for branch, out in ((1, 38), (2, 19)):
        c = 128 // div
        layers[(1, branch)] = [(f"conv5_{j + 1}_CPM_L{branch}", i, o, k) for j, (i, o, k) in
                               enumerate([(c, c, 3), (c, c, 3), (c, c, 3), (c, 512 // div, 1), (512 // div, out, 1)])]
        for s in range(2, 7):
            layers[(s, branch)] = [(f"Mconv{j + 1}_stage{s}_L{branch}", i, o, k) for j, (i, o, k) in
                                   enumerate([(38 + 19 + c, c, 7)] + [(c, c, 7)] * 4 + [(c, c, 1), (c, out, 1)])]
    return layers


def pose_net(div: int, seed: int):
    from brushwork.engine import annotators

    shapes = {n: (o, i, k, k) for group in pose_layers(div).values() for n, i, o, k in group if n != "pool"}
    torch.manual_seed(seed)
    net = annotators.BodyPoseNet(shapes).eval()
    with torch.no_grad():  # He's init, so that the picture reaches the 6th stage (torch's default fades it out)
        for conv in net.children():
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.bias.normal_(0, 0.01)
    return net


def pose_reference(sd: dict, x, div: int):
    """The 6-stage net with functional ops, a ReLU after every layer the original does not list."""
    def run(h, group):
        for n, _, _, k in group:
            if n == "pool":
                h = F.max_pool2d(h, 2, 2)
                continue
            h = F.conv2d(h, sd[f"{n}.weight"], sd[f"{n}.bias"], padding=k // 2)
            h = h if n in NO_RELU else F.relu(h)
        return h

    layers = pose_layers(div)
    features = run(x, layers["backbone"])
    h = features
    for s in range(1, 7):
        pafs, heatmaps = run(h, layers[(s, 1)]), run(h, layers[(s, 2)])
        h = torch.cat([pafs, heatmaps, features], 1)
    return pafs, heatmaps


# the original's limbs (1-based parts), their PAF channels (19-based) and the parts' colours (RGB)
LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
            [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
           [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]
COLOURS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
           [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
           [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]

# two people in a 128 x 128 picture: the 18 parts' (x, y) in COCO's order (nose, neck, right shoulder, elbow, wrist,
# left shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee, ankle, right eye, left eye, right ear, left ear)
SKELETON = [(32, 14), (32, 30), (20, 30), (14, 46), (10, 62), (44, 30), (50, 46), (54, 62), (24, 66), (22, 88),
            (20, 110), (40, 66), (42, 88), (44, 110), (28, 10), (36, 10), (22, 12), (42, 12)]
PEOPLE = [SKELETON, [(x + 64, y + 4) for x, y in SKELETON]]


def pose_maps(people, size: int = 128):
    """Heatmaps with a Gaussian (sigma 2) at each part and PAFs holding each limb's unit vector within 1.5 pixels of
    it: what a perfect net would give."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    heatmaps, pafs = np.zeros((size, size, 19)), np.zeros((size, size, 38))
    for person in people:
        for part, xy in enumerate(person):
            if xy is not None:
                heatmaps[:, :, part] += np.exp(-((xx - xy[0]) ** 2 + (yy - xy[1]) ** 2) / (2 * 2.0 ** 2))
        for (a, b), (pa, pb) in zip(LIMB_SEQ, MAP_IDX, strict=True):
            if [a, b] in ([3, 17], [6, 18]) or person[a - 1] is None or person[b - 1] is None:
                continue  # (the two limbs never drawn: no field)
            (xa, ya), (xb, yb) = person[a - 1], person[b - 1]
            v = np.array([xb - xa, yb - ya], float)
            length = np.linalg.norm(v)
            v /= length
            t = ((xx - xa) * v[0] + (yy - ya) * v[1]).clip(0, length)
            near = np.hypot(xx - (xa + t * v[0]), yy - (ya + t * v[1])) <= 1.5
            pafs[near, pa - 19], pafs[near, pb - 19] = v[0], v[1]
    heatmaps[100, 120, 4] = 1.0  # a stray wrist without limbs: no person
    return heatmaps, pafs


def test_openpose_runs_body_pose_model_pth(tmp_path):
    """body_pose_model.pth: the convs named by themselves (184 tensors, 52.3 M weights as the real one's); a narrow
    net in that layout through the public code gives a 3-channel uint8 map of the picture's size, the same twice;
    the net's numbers are the original layer table's (with its ReLU on the last heatmaps)."""
    from brushwork.engine import annotators, preprocessors

    needs_the_file("openpose", "body_pose_model.pth", tmp_path)
    real = pose_net(1, 0).state_dict()
    names = [n for group in pose_layers().values() for n, *_ in group if n != "pool"]
    assert sorted(real) == sorted(f"{n}.{w}" for n in names for w in ("weight", "bias")) and len(real) == 184
    assert sum(v.numel() for v in real.values()) == 52_311_446
    del real

    net = pose_net(8, 1)
    sd = net.state_dict()
    x = torch.rand(1, 3, 48, 40) - 0.5
    with torch.no_grad():
        ours, theirs = net(x), pose_reference(sd, x, 8)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert theirs[1].min() >= 0  # the ReLU'd heatmaps
    save(tmp_path, "body_pose_model.pth", net)
    found = preprocessors.find("openpose", tmp_path)
    first = preprocessors.detect(found, picture(4), MAP)
    assert first.dtype == np.uint8 and first.shape == (64, 80, 3)
    assert np.array_equal(first, preprocessors.detect(found, picture(4), MAP))
    for size in ((40, 48), (200, 232)):  # grown (Lanczos) and shrunk (area) to a height of 184
        img = np.random.default_rng(6).integers(0, 255, (*size, 3), dtype=np.uint8)
        heatmaps, pafs = annotators.body_pose_maps(annotators.build_body_pose(sd), img)
        expected_heatmaps, expected_pafs = pose_maps_reference(sd, img)
        assert heatmaps.shape == (*size, 19) and pafs.shape == (*size, 38)
        assert np.allclose(heatmaps, expected_heatmaps, atol=1e-4) and np.allclose(pafs, expected_pafs, atol=1e-4)


def pose_maps_reference(sd: dict, img):
    """The annotator's Body before the peaks, step by step: BGR, height 184, padded to 8 with 128, x / 256 - 0.5;
    each output channel grown 8 times (Lanczos), the padding cut, resized to the picture."""
    import cv2

    h, w = img.shape[:2]
    scale = 184 / h
    small = cv2.resize(img[:, :, ::-1], (int(w * scale), int(h * scale)),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4)
    sh, sw = small.shape[:2]
    full = np.full((sh + (8 - sh % 8) % 8, sw + (8 - sw % 8) % 8, 3), 128, np.uint8)
    full[:sh, :sw] = small
    with torch.no_grad():
        outputs = pose_reference(sd, torch.from_numpy(full.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None], 8)

    def back(t):
        k = (h + w) / (sh + sw)
        channels = []
        for c in t[0].numpy():
            c = cv2.resize(c, (c.shape[1] * 8, c.shape[0] * 8), interpolation=cv2.INTER_LANCZOS4)[:sh, :sw]
            channels.append(cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4))
        return np.stack(channels, axis=2)

    pafs, heatmaps = outputs
    return back(heatmaps), back(pafs)


def test_openpose_finds_and_draws_a_known_skeleton(tmp_path, monkeypatch):
    """The maps of two people (what a perfect net gives) become their 18 parts each, and the extension's drawing:
    each part a disc in its colour, each of the 17 limbs an ellipse in 60 % of its colour, on black."""
    from brushwork.engine import annotators, preprocessors

    heatmaps, pafs = pose_maps(PEOPLE)
    people = annotators.body_people(heatmaps, pafs)
    assert sorted(tuple(p) for p in people) == sorted(tuple(p) for p in PEOPLE)

    assert annotators.body_people(*pose_maps(PEOPLE[:1])) == [PEOPLE[0]]
    fragment = [None] * 18
    fragment[1:4] = SKELETON[1:4]  # neck, right shoulder, elbow: under 4 parts, no person
    assert annotators.body_people(*pose_maps([fragment])) == []
    fragment[4] = SKELETON[4]
    assert annotators.body_people(*pose_maps([fragment])) == [fragment]

    save(tmp_path, "body_pose_model.pth", pose_net(8, 2))
    monkeypatch.setattr(annotators, "body_pose_maps", lambda model, img: (heatmaps, pafs))
    drawn = preprocessors.detect(preprocessors.find("openpose", tmp_path), Image.new("RGB", (128, 128)), 128)
    assert drawn.shape == (128, 128, 3) and drawn.dtype == np.uint8
    assert drawn[0, 0].tolist() == [0, 0, 0] and drawn[127, 64].tolist() == [0, 0, 0]
    for person in PEOPLE:
        for i, (x, y) in enumerate(person):
            if all(np.hypot(x - u, y - v) > 4 for u, v in person[i + 1:]):  # not under a later part's disc
                assert drawn[y, x].tolist() == COLOURS[i], i
        checked = 0
        for k, (a, b) in enumerate(LIMB_SEQ[:17]):
            (xa, ya), (xb, yb) = person[a - 1], person[b - 1]
            mx, my = (xa + xb) // 2, (ya + yb) // 2
            clear = all(np.hypot(mx - u, my - v) > 6 for u, v in person) and all(
                _distance((mx, my), person[c - 1], person[d - 1]) > 6 for c, d in LIMB_SEQ[k + 1:17])
            if clear:
                limb = [int(c * 0.6) for c in COLOURS[k]]
                assert drawn[my, mx].tolist() == limb, k
                if abs(xa - xb) <= 2:  # upright: 9 pixels across (the ellipse's half width is 4)
                    assert (drawn[my, mx - 8:mx + 9] == limb).all(axis=1).sum() == 9, k
                checked += 1
        assert checked >= 8


def _distance(p, a, b) -> float:
    p, a, b = (np.array(q, float) for q in (p, a, b))
    t = np.clip(np.dot(p - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
    return float(np.linalg.norm(p - (a + t * (b - a))))


def test_openpose_peaks_are_scipys_gaussian_filter_maxima():
    """The peaks: local maxima of scipy's gaussian_filter(sigma=3) above 0.1 (cv2's blur with reflected edges here,
    scipy's in the annotator), scored by the unblurred map."""
    gaussian_filter = pytest.importorskip("scipy.ndimage").gaussian_filter
    from brushwork.engine import annotators

    rng = np.random.default_rng(5)
    heatmaps = np.zeros((60, 70, 19))
    for part in range(18):
        for _ in range(3):
            y, x = rng.integers(0, 60), rng.integers(0, 70)
            heatmaps[y, x, part] = rng.uniform(2, 20)
    heatmaps += rng.uniform(0, 0.3, heatmaps.shape)
    ours = annotators._peaks(heatmaps)
    counter = 0
    for part in range(18):
        blurred = gaussian_filter(heatmaps[:, :, part], sigma=3)
        padded = np.pad(blurred, 1)
        peak = ((blurred >= padded[:-2, 1:-1]) & (blurred >= padded[2:, 1:-1]) & (blurred >= padded[1:-1, :-2])
                & (blurred >= padded[1:-1, 2:]) & (blurred > 0.1))
        ys, xs = np.nonzero(peak)
        expected = [(x, y, heatmaps[y, x, part], counter + i) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
        counter += len(expected)
        assert [p[:2] for p in ours[part]] == [p[:2] for p in expected] and len(expected) > 0
        assert np.allclose([p[2] for p in ours[part]], [p[2] for p in expected])
        assert [p[3] for p in ours[part]] == [p[3] for p in expected]


def test_the_extensions_detect_route_runs_an_annotator_in_the_library(tmp_path):
    """/controlnet/detect with softedge_hed: the map of ControlNetHED.pth in the library's annotators/ folder, the
    same as detect gives; lineart_anime, whose file is not there, is a 422 naming netG.pth."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from brushwork import Engine, Settings
    from brushwork.engine import annotators, preprocessors
    from brushwork.server.app import create_app

    models = tmp_path / "home" / "models"
    (models / "annotators").mkdir(parents=True)
    torch.manual_seed(4)
    torch.save(annotators.ControlNetHED((8, 16, 16, 16, 16), (2, 2, 3, 3, 3)).state_dict(),
               models / "annotators" / "ControlNetHED.pth")
    engine = Engine(Settings(home=tmp_path / "home"))
    buf = io.BytesIO()
    picture(7).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    with TestClient(create_app(engine, engine.settings)) as client:
        r = client.post("/controlnet/detect", json={"controlnet_module": "softedge_hed",
                                                    "controlnet_input_images": [image], "controlnet_processor_res": MAP})
        assert r.status_code == 200, r.text
        detected = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(detected, preprocessors.detect(preprocessors.find("hed", models), picture(7), MAP))
        missing = client.post("/controlnet/detect", json={"controlnet_module": "lineart_anime",
                                                          "controlnet_input_images": [image]})
        assert missing.status_code == 422 and "netG.pth" in missing.json()["detail"]
