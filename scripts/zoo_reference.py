"""Reference figures for distill's ImageNet zoo, computed with PyTorch and torchvision.

For every architecture: the state dict's names and shapes in order (without BatchNorm's `num_batches_tracked`),
the parameter count, the MACs of the convolutions and Linear layers on one 224x224 image (counted by forward hooks,
as Distiller's `model_performance_summary` counts them), and the output shape. torchvision provides the models it
has; Distiller's own (MobileNet v1, AlexNet-BN, the pre-activation ResNets) are re-stated below from Distiller's
`distiller/models/imagenet` (Apache-2.0): only their layer structure matters here.

    python scripts/zoo_reference.py > tests/data/imagenet_zoo.json    # needs torch==2.13.0, torchvision==0.28.0
"""
import json
import sys

import torch
import torch.nn as nn
import torchvision


def conv_bn_relu(cin, cout, k, stride=1, padding=0, groups=1):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class MobileNetV1(nn.Module):
    def __init__(self):
        super().__init__()
        blocks = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        layers = [nn.Sequential(*conv_bn_relu(3, 32, 3, 2, 1))]
        layers += [nn.Sequential(*conv_bn_relu(i, i, 3, s, 1, i), *conv_bn_relu(i, o, 1)) for i, o, s in blocks]
        self.model = nn.Sequential(*layers, nn.AvgPool2d(7))
        self.fc = nn.Linear(1024, 1000)

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


class AlexNetBN(nn.Module):
    def __init__(self):
        super().__init__()
        bn = lambda n: nn.BatchNorm2d(n, eps=1e-4, momentum=0.9)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 12, stride=4), nn.ReLU(),
            nn.Conv2d(96, 256, 5, padding=2, groups=2, bias=False), bn(256), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(),
            nn.Conv2d(256, 384, 3, padding=1, bias=False), bn(384), nn.MaxPool2d(3, 2, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2, bias=False), bn(384), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2, bias=False), bn(256), nn.MaxPool2d(3, 2), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Linear(9216, 4096, bias=False), nn.BatchNorm1d(4096, eps=1e-4, momentum=0.9), nn.ReLU(),
            nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096, eps=1e-4, momentum=0.9), nn.ReLU(),
            nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class PreactBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, downsample, preactivate, bottleneck):
        super().__init__()
        if preactivate:
            self.pre_bn, self.pre_relu = nn.BatchNorm2d(inplanes), nn.ReLU()
        self.preactivate = preactivate
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1_2, self.relu1_2 = nn.BatchNorm2d(planes), nn.ReLU()
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2_3, self.relu2_3 = nn.BatchNorm2d(planes), nn.ReLU()
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.body = ["conv1", "bn1_2", "relu1_2", "conv2", "bn2_3", "relu2_3", "conv3"]
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1_2, self.relu1_2 = nn.BatchNorm2d(planes), nn.ReLU()
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.body = ["conv1", "bn1_2", "relu1_2", "conv2"]
        self.downsample = downsample

    def forward(self, x):
        preact = self.pre_relu(self.pre_bn(x)) if self.preactivate else x
        out = preact
        for name in self.body:
            out = getattr(self, name)(out)
        return out + (self.downsample(preact) if self.downsample is not None else x)


class PreactResNet(nn.Module):
    def __init__(self, bottleneck, layers):
        super().__init__()
        expansion = 4 if bottleneck else 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu1, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False))
            blocks = [PreactBlock(inplanes, planes, stride, downsample, stride != 1, bottleneck)]
            inplanes = planes * expansion
            blocks += [PreactBlock(inplanes, planes, 1, None, True, bottleneck) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.final_bn, self.final_relu = nn.BatchNorm2d(512 * expansion), nn.ReLU()
        self.avgpool, self.fc = nn.AvgPool2d(7, 1), nn.Linear(512 * expansion, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(self.final_relu(self.final_bn(x))).flatten(1))


tv = torchvision.models
MODELS = {
    **{name: getattr(tv, name) for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet", "squeezenet1_0", "squeezenet1_1", "mobilenet_v2"]},
    **{name: getattr(tv, name) for name in ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]},
    "preact_resnet18": lambda: PreactResNet(False, [2, 2, 2, 2]),
    "preact_resnet34": lambda: PreactResNet(False, [3, 4, 6, 3]),
    "preact_resnet50": lambda: PreactResNet(True, [3, 4, 6, 3]),
    "preact_resnet101": lambda: PreactResNet(True, [3, 4, 23, 3]),
    "preact_resnet152": lambda: PreactResNet(True, [3, 8, 36, 3]),
    "mobilenet": MobileNetV1,
    "alexnet_bn": AlexNetBN,
}


def macs(model):
    total = []

    def hook(m, inputs, output):
        if isinstance(m, nn.Conv2d):
            total.append(output.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            total.append(m.in_features * m.out_features * (output.numel() // m.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return sum(total), list(out.shape)


def main():
    reference = {"source": f"torch {torch.__version__}, torchvision {torchvision.__version__}", "models": {}}
    for name, build in MODELS.items():
        model = build().eval()
        state = [[k, list(v.shape)] for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
        mac_count, out_shape = macs(model)
        params = sum(p.numel() for p in model.parameters())
        reference["models"][name] = {"parameters": params, "macs": mac_count, "output": out_shape, "state_dict": state}
        print(f"{name}: {params} parameters, {mac_count} MACs", file=sys.stderr)
    json.dump(reference, sys.stdout, separators=(",", ":"))


if __name__ == "__main__":
    main()
