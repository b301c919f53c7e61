"""The optimizer of a run and which parameters it decays."""
import mindspore as ms
from mindspore import nn


def parameter_groups(net, weight_decay):
    """Weight decay on everything but BatchNorm's gamma/beta."""
    bn_ids = set()
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn_ids.update(id(p) for p in cell.get_parameters())
    params = net.trainable_params()
    decay = [p for p in params if id(p) not in bn_ids]
    no_decay = [p for p in params if id(p) in bn_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg, net, lr_per_step):
    """SGD with momentum; the learning rate is indexed by the optimizer's own step counter."""
    return nn.SGD(parameter_groups(net, cfg.weight_decay), learning_rate=ms.Tensor(lr_per_step),
                  momentum=cfg.momentum)
