"""The IResNet backbone and our train step in PyTorch: the benchmark's reference (never imported by
src/ or the tests' required set; torch lives in the separate bench environment, see `make bench-torch`).

Written here from the topology in src/models/iresnet.py, with module names chosen so that every
parameter of a MindSpore checkpoint maps onto one of this network (`load_mindspore`):

  conv*.weight, fc.weight/bias                  -> the same names
  BatchNorm gamma / beta                        -> weight / bias
  BatchNorm moving_mean / moving_variance       -> running_mean / running_var
  PReLU w                                       -> weight

`TorchStep` is the step arcface_torch takes on one CPU, with the numbers of ours: the combined
margin (arccos, differentiated through as our default `exact` margin gradient), the log-sum-exp
softmax cross-entropy over normalised embeddings and centres, SGD with momentum and weight decay
on everything but BatchNorm. BatchNorm momentum 0.1 in PyTorch is 0.9 in MindSpore's convention.
"""
import torch
from torch import nn

LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
EPS = 1e-5


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=EPS, momentum=0.1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.prelu = nn.PReLU(cout, 0.25)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = _bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), _bn(cout))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, name, width=64, num_features=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = _bn(width)
        self.prelu = nn.PReLU(width, 0.25)
        cin = width
        for index, (multiple, depth) in enumerate(zip((1, 2, 4, 8), LAYERS[name]), 1):
            cout = width * multiple
            blocks = [Block(cin, cout, 2)] + [Block(cout, cout, 1) for _ in range(depth - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = _bn(cin)
        self.fc = nn.Linear(cin * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=EPS, momentum=0.1)
        self.features.weight.requires_grad_(False)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


_RENAME = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def torch_name(mindspore_name):
    """The name in this network of a MindSpore backbone parameter (without the `backbone.` prefix)."""
    parent, _, leaf = mindspore_name.rpartition(".")
    if leaf == "w" and parent.endswith("prelu"):
        return f"{parent}.weight"
    return f"{parent}.{_RENAME.get(leaf, leaf)}"


def load_mindspore(model, arrays):
    """Set `model`'s tensors from {MindSpore backbone name: ndarray}; every tensor of the model must
    be given (the parameter sets are equal, not just overlapping)."""
    state = model.state_dict()
    mapped = {torch_name(name): value for name, value in arrays.items()}
    missing = [name for name in state if name not in mapped and not name.endswith("num_batches_tracked")]
    extra = [name for name in mapped if name not in state]
    if missing or extra:
        raise KeyError(f"parameter sets differ: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in mapped.items():
            state[name].copy_(torch.from_numpy(value).reshape(state[name].shape))


class ArcFaceHead(nn.Module):
    """Combined margin (m1 theta + m2) - m3 at scale s, log-sum-exp cross-entropy; centres (classes, D)."""

    def __init__(self, num_classes, dim=512, s=64.0, m1=1.0, m2=0.5, m3=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim).normal_(0, 0.01))
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def forward(self, embeddings, labels):
        def unit(x):
            return x / torch.sqrt((x * x).sum(1, keepdim=True) + 1e-12)
        bound = 1.0 - 1e-7
        cos = (unit(embeddings) @ unit(self.weight).t()).clamp(-bound, bound)
        one_hot = torch.nn.functional.one_hot(labels.long(), cos.shape[1]).to(cos.dtype)
        target_cos = (cos * one_hot).sum(1, keepdim=True)
        target = torch.cos(self.m1 * torch.acos(target_cos) + self.m2) - self.m3
        logits = self.s * (cos + one_hot * (target - target_cos))
        shifted = logits - logits.detach().max(1, keepdim=True)[0]
        return (torch.log(torch.exp(shifted).sum(1)) - (shifted * one_hot).sum(1)).mean()


class TorchStep:
    """step(images, labels) -> loss: forward, backward and one SGD update of backbone + head."""

    def __init__(self, backbone, head, lr, momentum=0.9, weight_decay=1e-4):
        self.backbone, self.head = backbone, head
        norms = {id(p) for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
        params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in norms], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in norms], "weight_decay": 0.0}]
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)

    def __call__(self, images, labels):
        self.backbone.train()
        loss = self.head(self.backbone(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)



def _peak_mb():
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))


def _step_from_state(network, width, num_classes, batch_size, npz, lr, seed):
    """(backbone, TorchStep, four fixed batches) from the state in `npz` (bench/step_state.py)."""
    import numpy as np

    arrays = np.load(npz)
    torch.manual_seed(0)
    backbone = IResNet(network, width)
    load_mindspore(backbone, {k[len("backbone."):]: arrays[k] for k in arrays.files if k.startswith("backbone.")})
    head = ArcFaceHead(num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(arrays["head.weight"]))
    rng = np.random.default_rng(seed)
    data = [(torch.from_numpy(rng.uniform(-1, 1, (batch_size, 3, 112, 112)).astype(np.float32)),
             torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))) for _ in range(4)]
    return backbone, TorchStep(backbone, head, lr), data


def measure(network, width, num_classes, batch_size, npz, lr, steps, seed=1):
    """The same figures as train_speed.py's MindSpore worker: per-step wall and CPU ms of training from
    the state in `npz`, then inference img/s of the backbone in eval mode."""
    import resource
    import time

    backbone, step, data = _step_from_state(network, width, num_classes, batch_size, npz, lr, seed)

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    step(*data[0])
    step(*data[1])
    wall, used = [], []
    for i in range(steps):
        tick, c = time.perf_counter(), cpu()
        loss = step(*data[i % len(data)])
        float(loss)
        wall.append(time.perf_counter() - tick)
        used.append(cpu() - c)
    train_peak = _peak_mb()
    backbone.eval()
    with torch.inference_mode():
        backbone(data[0][0])
        tick = time.perf_counter()
        for i in range(steps):
            backbone(data[i % len(data)][0]).numpy()
        infer = batch_size * steps / (time.perf_counter() - tick)
    return {"wall_ms": [w * 1000 for w in wall], "cpu_ms": [c * 1000 for c in used], "infer_ips": infer,
            "train_peak_mb": train_peak, "threads": torch.get_num_threads(), "loss": float(loss)}


def parity(npz_in, npz_out=None):
    """Compare with the MindSpore side's figures in `npz_in` (written by train_speed.py --_parity):
    trainable parameter count, eval-mode embeddings, and train-mode loss and gradients on one batch."""
    import numpy as np

    ref = np.load(npz_in)
    network, width, classes = str(ref["meta_network"]), int(ref["meta_width"]), int(ref["meta_classes"])
    backbone = IResNet(network, width)
    weights = {k[len("w.backbone."):]: ref[k] for k in ref.files if k.startswith("w.backbone.")}
    load_mindspore(backbone, weights)
    head = ArcFaceHead(classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(ref["w.head.weight"]))
    images, labels = torch.from_numpy(ref["images"]), torch.from_numpy(ref["labels"].astype(np.int64))
    backbone.eval()
    with torch.no_grad():
        embeddings = backbone(images).numpy()
    backbone.train()
    loss = head(backbone(images), labels)
    loss.backward()
    names = {torch_name(k): k for k in weights}
    # Relative to the largest gradient of the backbone: BatchNorm biases followed by another BatchNorm
    # have a zero gradient in exact arithmetic, which both frameworks give as rounding noise (~1e-7).
    pairs = [(name, param.grad.numpy(), ref["g.backbone." + names[name]])
             for name, param in backbone.named_parameters() if param.grad is not None]
    scale = max(float(np.abs(ours).max()) for _, _, ours in pairs)
    worst, worst_name = max((float(np.abs(theirs - ours).max()) / scale, name) for name, theirs, ours in pairs)
    head_rel = float(np.abs(head.weight.grad.numpy() - ref["g.head.weight"]).max()
                     / np.abs(ref["g.head.weight"]).max())
    return {"params_torch": count_trainable(backbone), "params_ours": int(ref["meta_params"]),
            "embedding_max_abs": float(np.abs(embeddings - ref["embeddings"]).max()),
            "embedding_scale": float(np.abs(ref["embeddings"]).max()),
            "loss_torch": float(loss.detach()), "loss_ours": float(ref["loss"]),
            "grad_max_rel": worst, "grad_worst": worst_name, "head_grad_max_rel": head_rel}


def profile(network, width, num_classes, batch_size, npz, lr, steps, seed=1):
    """torch.profiler's operators of `steps` training steps from the state in `npz`: per operator
    (self CPU time, as MindSpore's profiler counts a kernel) calls and ms per step, and the wall
    time per step."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step, data = _step_from_state(network, width, num_classes, batch_size, npz, lr, seed)
    step(*data[0])
    step(*data[1])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        for i in range(steps):
            float(step(*data[i % len(data)]))
        wall = (time.perf_counter() - tick) / steps * 1000
    ops = [{"type": e.key, "name": e.key, "calls": e.count / steps, "ms": e.self_cpu_time_total / 1000 / steps}
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return {"wall_ms": wall, "ops": ops}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="PyTorch worker of bench/train_speed.py")
    parser.add_argument("--parity", help="npz written by the MindSpore side")
    parser.add_argument("--network", default="r18")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--npz")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's operators instead")
    parser.add_argument("--onednn", action="store_true", help="two steps, then one after a marker line, for "
                                                             "ONEDNN_VERBOSE=1 (bench/profile_step.py --onednn)")
    args = parser.parse_args()
    if args.onednn:
        _, step, data = _step_from_state(args.network, args.width, args.num_classes, args.batch_size, args.npz,
                                         args.lr, 1)
        step(*data[0])
        step(*data[1])
        from step_state import ONEDNN_MARKER
        print(ONEDNN_MARKER, flush=True)
        float(step(*data[2]))
        print(json.dumps({"done": True}), flush=True)
    elif args.profile:
        print(json.dumps(profile(args.network, args.width, args.num_classes, args.batch_size, args.npz, args.lr,
                                 args.steps)))
    elif args.parity:
        print(json.dumps(parity(args.parity)))
    else:
        print(json.dumps(measure(args.network, args.width, args.num_classes, args.batch_size, args.npz, args.lr,
                                 args.steps)))
