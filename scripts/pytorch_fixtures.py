"""PyTorch-written checkpoints for tests/pytorch_checkpoints.rs, made with torch 2.13.0 (not needed to run the tests).

    python scripts/pytorch_fixtures.py tests/data/pytorch            # the checked-in resnet20_cifar fixtures
    python scripts/pytorch_fixtures.py --resnet18 DIR                 # torchvision's resnet18 (45 MB, made on demand)

Distiller's ResNetCifar is restated here from distiller/models/cifar10/resnet_cifar.py (Apache-2.0): only its layer
structure and names matter. Batch-norm statistics are randomized so that loading them wrongly would show.
"""
import os
import sys

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(planes), nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.relu2(residual + out)


class ResNetCifar(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        inplanes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool, self.fc = nn.AvgPool2d(8, 1), nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).flatten(1))


class Unknown:
    pass


def randomize_statistics(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.num_batches_tracked.fill_(1234)


def resnet20_fixtures(out):
    torch.manual_seed(20)
    model = ResNetCifar(3).eval()
    randomize_statistics(model)
    # Distiller-style pruning: half of layer1.0.conv1's filters masked to zero.
    mask = torch.ones_like(model.layer1[0].conv1.weight)
    mask[::2] = 0
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # gives the optimizer state a momentum buffer, as a real checkpoint has
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(mask)
    torch.save(model.state_dict(), os.path.join(out, "resnet20_cifar.pth"))
    distiller = {
        "epoch": 7,
        "arch": "resnet20_cifar",
        "dataset": "cifar10",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "extras": {"best_top1": 91.25, "best_epoch": 6, "current_top1": 90.5},
        "optimizer_type": type(optimizer),
        "optimizer_state_dict": optimizer.state_dict(),
        "compression_sched": {"masks_dict": {"module.conv1.weight": None, "module.layer1.0.conv1.weight": mask}},
    }
    # The legacy (pre-1.6) container, as Distiller-era files often are.
    torch.save(distiller, os.path.join(out, "resnet20_cifar_distiller.pth.tar"), _use_new_zipfile_serialization=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.save({"input": x, "output": model(x)}, os.path.join(out, "resnet20_cifar_io.pth"))
    torch.save({"config": Unknown()}, os.path.join(out, "unknown_class.pth"))
    # Distiller checkpoints distill refuses: a thinned model's and a quantized model's (tiny stand-ins).
    small = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    recipe = {"parameters": {"fc.weight": [(1, torch.tensor([0, 1, 2]))]}}
    torch.save({"arch": "mlp", "state_dict": small, "thinning_recipes": [recipe]}, os.path.join(out, "distiller_thinned.pth.tar"))
    torch.save({"arch": "mlp", "state_dict": small, "quantizer_metadata": {"type": "PostTrainLinearQuantizer", "params": {"bits_activations": 8}}}, os.path.join(out, "distiller_quantized.pth.tar"))
    # A whole model rather than its state dict.
    torch.manual_seed(1)
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), os.path.join(out, "whole_model.pt"))


def resnet18_fixture(out):
    import torchvision

    torch.manual_seed(18)
    model = torchvision.models.resnet18().eval()
    randomize_statistics(model)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "arch": "resnet18"}, os.path.join(out, "resnet18.pth.tar"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.save({"input": x, "output": model(x)}, os.path.join(out, "resnet18_io.pth"))


if __name__ == "__main__":
    if sys.argv[1] == "--resnet18":
        resnet18_fixture(sys.argv[2])
    else:
        resnet20_fixtures(sys.argv[1])
