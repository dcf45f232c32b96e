#!/usr/bin/env python3
"""The PyTorch side of resnet_gpu_bench: the same ResNet-18 (ImageNet stem, 1000 classes), the same
224x224 synthetic batch, SGD with momentum and weight decay, autocast for bf16, cuDNN benchmark
mode, on one GPU, in images/s; --channels-last stores the model and the batch channels_last. Written
out here (not torchvision's) so that the two models are the same layer for layer and torchvision need
not be installed.

    python3 benchmarks/resnet_torch_bench.py [--batch 64] [--steps 50] [--warmup 10]
                                             [--precision fp32,bf16] [--channels-last] [--json FILE]
Exits 77 when CUDA is not usable, and 2 with the usage on a bad argument: the bounds are
resnet_gpu_bench's (--batch and --steps >= 1, --warmup >= 0, precisions among fp32, bf16, fp16), and
they are checked before torch is imported.
"""
import argparse
import json
import sys
import time

PRECISIONS = ("fp32", "bf16", "fp16")


def int_at_least(low):
    """An argparse type: a decimal integer >= low ("must be an integer >= 1, found '0'")."""
    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, found '{text}'")
        return value
    return parse


def precision_list(text):
    """An argparse type: comma-separated precisions, each one of PRECISIONS."""
    names = text.split(",")
    for name in names:
        if name not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"'{name}' is not one of {', '.join(PRECISIONS)} (in '{text}')")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="ResNet-18 training throughput in PyTorch on one GPU (the twin of resnet_gpu_bench).")
    parser.add_argument("--batch", type=int_at_least(1), default=64, metavar="N",
                        help="images per step (default 64)")
    parser.add_argument("--steps", type=int_at_least(1), default=50, metavar="N",
                        help="timed steps per precision (default 50)")
    parser.add_argument("--warmup", type=int_at_least(0), default=10, metavar="N",
                        help="untimed steps first (default 10)")
    parser.add_argument("--precision", type=precision_list, default=["fp32", "bf16"], metavar="P[,P...]",
                        help=f"precisions to measure, comma-separated, among {', '.join(PRECISIONS)} "
                             "(default fp32,bf16)")
    parser.add_argument("--channels-last", action="store_true",
                        help="store the model's weights and the batch channels_last (NHWC)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    return parser.parse_args(argv)


def resnet18_class():
    """The model, defined once torch is imported (torch is imported only after the arguments are checked)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self, num_classes=1000, width=64):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            layers, cin = [], width
            for i, stride in enumerate([1, 2, 2, 2]):
                cout = width * 2 ** i
                layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            x = self.layers(x)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet18


def main():
    args = parse_args()
    ResNet18 = resnet18_class()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("resnet_torch_bench: CUDA is not usable; nothing to measure")
        return 77
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    layout = "channels_last" if args.channels_last else "nchw"
    print(f"# PyTorch {torch.__version__}, ResNet-18 training, 224x224 synthetic, batch {args.batch}, {layout}, "
          f"{torch.cuda.get_device_name(device)}")
    print(f"{'precision':<10} {'images/s':>12} {'ms/step':>12}")
    rows = []
    for precision in args.precision:
        torch.manual_seed(0)
        model = ResNet18().to(device).train()
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        def step():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        images = args.batch * args.steps / seconds
        print(f"{precision:<10} {images:12.1f} {1e3 * seconds / args.steps:12.2f}", flush=True)
        rows.append({"impl": "pytorch", "precision": precision, "layout": layout, "images_per_s": images,
                     "ms_per_step": 1e3 * seconds / args.steps, "batch": args.batch})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"benchmark": "resnet18_gpu", "impl": "pytorch", "torch": torch.__version__,
                       "results": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
