"""kNN-Per: Marfoq, Neglia, Vidal, Kameni, "Personalized Federated Learning through Local
Memorization", ICML 2022, arXiv 2111.09360 (reference code: github.com/omarfoq/knn-per,
client.py `KNNPerClient`, datastore.py).

A global model is trained by FedAvg; each client personalizes it at inference time by interpolating
its prediction with a k-nearest-neighbour model over a local datastore of embeddings.

    Training: FedAvg exactly (methods/fedavg.py): w_i <- w; local_epochs of SGD; w <- sum_i n_i w_i / sum_i n_i
    Eval, client i with the global w:
        datastore   S_i = {(phi(x_j), y_j) : (x_j, y_j) in the client's TRAIN split}
                    (computed in eval mode; store_mode = "train": in train mode, see below)
        embedding   phi(x) = the input of the model's final Linear classifier (= body(x) for
                    mlp / cnn / resnet, whose head is that Linear)   (features = "head_input")
                    or the input of the body's last BatchNorm          (features = "pre_norm")
        distance    d(x, x_j) = ||phi(x) - phi(x_j)||^2       (squared L2, the reference's faiss IndexFlatL2)
        p_kNN(y|x)  = sum_{j in N_k(x)} softmax_j(-d(x, x_j) / temperature) 1[y_j = y]
                      over the k nearest neighbours N_k(x) (the paper's
                      p_kNN(y|x) ∝ sum_j 1[y_j = y] exp(-d(x, x_j) / T), normalized)   (kernel = "softmax_sq")
                    = sum_{j in N_k(x)} softmax_j(-||phi(x) - phi(x_j)||_2) 1[y_j = y]  (kernel = "exp_l2")
        p_global    = softmax(w's logits)
        p(y|x)      = mix * p_kNN(y|x) + (1 - mix) * p_global(y|x)
        metrics     accuracy of argmax_y p(y|x); loss = NLL of the mixed probability, -log p(y_true|x)
    Nothing persists: the datastore is rebuilt from the current w at every evaluation.

Choices, and where they come from:
  * The mixture is computed in log space, log p = logaddexp(log(mix) + log p_kNN,
    log(1 - mix) + log_softmax(logits)), so mix = 0 gives exactly log_softmax(logits): accuracy and
    loss equal to FedAvg's evaluation of the same w, bit for bit (both use log_softmax + nll_loss,
    summed over the same chunks).
  * Temperature: by default T = features_dimension * scale with scale = 1, as the reference
    (`gather_knn_outputs`: exp(-d / (features_dimension * scale))) and FL-bench do; the feature
    dimension is the in_features of the model's final Linear (200 for mlp, 512 for cnn, 64 for
    resnet20). `knnper.temperature` sets T directly instead. Raising T flattens the vote toward a
    plain count over the k neighbours; T -> 0 is 1-NN.
  * mix is one fixed value for every client (default 0.5: kNN and global weighted equally); the
    reference sweeps the weight over 0.1, ..., 1.0 after training and reports per value (selecting
    it on validation data is left to a sweep over `knnper.mix`, which optimizes acc/val).
  * k is capped at the datastore size; a client with no training samples has no datastore and
    is evaluated with p_global alone (the reference warns and does the same).
  * The full training split is the datastore (the reference's capacity = -1, "all samples").
  * mix = 1 can give the true class probability 0 (no neighbour with that label): the loss is then
    +inf, the honest NLL of that prediction.

The FeDEQ reference's kNN-Per (longtanle/FeDEQ `trainers/vision/knnper_resnet.py`,
`trainers/sequence/knnper_seq.py`) differs from omarfoq/knn-per in three ways, each an option here
whose default keeps the harness's earlier numbers:
  * kernel = "softmax_sq" (default): the weights above. "exp_l2": the reference's
    `knn_softmax[i, label] += np.exp(-nbr_dist)`, rows normalized to sum to 1 (knnper_resnet.py lines
    79-93, knnper_seq.py the same function), with sklearn's NearestNeighbors distances, i.e. plain
    (not squared) L2 and no temperature: computed as softmax_j(-d_j), the same numbers, which stays
    finite where every exp(-d_j) underflows (the reference's rows then become 0/0). `temperature`
    must stay unset with it (one line says so otherwise); `scale` is not used.
  * features = "head_input" (default): the classifier's input. "pre_norm": the input of the body's
    last BatchNorm, which on resnet20 / resnet34 is the reference's CIFAR `embedding`, the 128-d ReLU
    output before `linear_batchnorm` (utils/resnet_cifar.py and resnet_cifar100.py lines 241-245).
    The reference's FEMNIST ResNet returns the embedding after that BatchNorm (utils/resnet_femnist.py
    lines 396-398), which is the classifier's input: "head_input" there. A model without BatchNorm
    in its body is refused with one line.
  * store_mode = "eval" (default): the datastore's embeddings come from eval-mode forwards.
    "train": from one train-mode forward of the whole training split, as the reference's
    `self.model.apply(params, net_state, rng, train_inputs)` (knnper_resnet.py line 122; the model's
    is_training defaults to True; knnper_seq.py line 162 likewise): BatchNorm normalizes with the
    split's own batch statistics and dropout is active (drawing from torch's global generator, which
    the worker seeds per job). The running statistics that forward updates are put back, as the
    reference discards the state it returns; the queries are embedded in eval mode either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import MethodConfig, register_method
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.nets import embedding_norm, features_and_logits, final_linear
from fedeq_bench.methods.train import EVAL_CHUNK, as_rows, eval_mode, load, metrics_from_counts

QUERY_ROWS = 256
"""Query rows per distance matrix: with per-position targets the datastore holds every training
token (Shakespeare: ~10^5), so the (queries x keys) matrix is bounded by chunking the queries."""


@dataclass(frozen=True)
class KNNPerConfig(MethodConfig):
    k: int = ranged(10, ge=1)
    """Neighbours in the kNN vote; raising it smooths p_kNN toward the client's label distribution."""
    mix: float = ranged(0.5, ge=0, le=1)
    """Weight lam of p_kNN in the mixture (0: the global model alone, 1: the kNN model alone);
    raising it personalizes more."""
    temperature: float | None = ranged(None, gt=0)
    """Kernel temperature T over squared distances; raising it weighs far neighbours more (flatter
    vote). None: the reference's T = feature dimension * scale."""
    scale: float = ranged(1.0, gt=0)
    """The reference's kernel scale, used when temperature is None (T = feature dimension * scale);
    raising it flattens the vote."""
    kernel: Literal["softmax_sq", "exp_l2"] = "softmax_sq"
    """Neighbour weights: softmax(-d^2 / T) over squared L2 distances (`softmax_sq`, omarfoq/knn-per), or
    exp(-d) over L2 distances, normalized, with no temperature (`exp_l2`, the FeDEQ reference)."""
    features: Literal["head_input", "pre_norm"] = "head_input"
    """The embedding: the classifier's input (`head_input`), or the input of the body's last BatchNorm
    (`pre_norm`, the FeDEQ reference's CIFAR ResNets)."""
    store_mode: Literal["eval", "train"] = "eval"
    """The datastore's embeddings from eval-mode forwards (`eval`), or from one train-mode forward of the
    training split (`train`, the FeDEQ reference: batch statistics, dropout on)."""


def knn_probs(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, k: int,
              temperature: float, num_classes: int, kernel: str = "softmax_sq") -> torch.Tensor:
    """p_kNN (N, C): over the k nearest keys, softmax of -d/temperature with d the squared L2 distance
    (`softmax_sq`), or of -d with d the L2 distance (`exp_l2`: exp(-d) normalized; `temperature` is
    not used), summed per label. `k` is capped at the number of keys (there must be at least one)."""
    # Pairwise, without the matrix-product shortcut: exact per pair whatever the chunk size.
    d = torch.cdist(query, keys, compute_mode="donot_use_mm_for_euclid_dist")
    if kernel == "softmax_sq":
        d = d.pow(2)
    dist, idx = torch.topk(d, min(int(k), keys.shape[0]), dim=1, largest=False)
    weights = torch.softmax(-dist / temperature if kernel == "softmax_sq" else -dist, dim=1)
    probs = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return probs.scatter_add_(1, labels[idx], weights)


def mixed_log_probs(logits: torch.Tensor, p_knn: torch.Tensor | None, mix: float) -> torch.Tensor:
    """log(mix * p_knn + (1 - mix) * softmax(logits)), in log space (mix = 0: log_softmax exactly)."""
    log_global = F.log_softmax(logits, dim=1)
    if p_knn is None:
        return log_global
    a = math.log(mix) if mix > 0 else -math.inf
    b = math.log1p(-mix) if mix < 1 else -math.inf
    return torch.logaddexp(a + torch.log(p_knn), b + log_global)


@register_method("knnper")
class KNNPer(FedAvg):
    """Training, broadcast, aggregation and (empty) personalization are FedAvg's."""

    Config = KNNPerConfig

    def param_split(self, net):
        """FedAvg's (everything shared). Also where the options are checked against the model, since
        the harness calls it before anything is recorded: a model without the BatchNorm that
        features = "pre_norm" needs, or a temperature set with kernel = "exp_l2", is one line there."""
        self.feature_layer(net)
        self._check_kernel()
        return super().param_split(net)

    def feature_layer(self, net: torch.nn.Module | None = None) -> torch.nn.Module:
        """The module of `net` (default: the scratch network) whose input is the embedding: the
        classifier, or the body's last BatchNorm."""
        net = self.net if net is None else net
        if self.cfg.features == "head_input":
            return final_linear(net)
        norm = embedding_norm(net)
        if norm is None:
            raise BenchError(f"knnper.features=pre_norm needs a BatchNorm in the model's body (resnet20, resnet34); "
                             f"model {self.task.model!r} has none: use knnper.features=head_input")
        return norm

    def _check_kernel(self) -> None:
        if self.cfg.kernel == "exp_l2" and self.cfg.temperature is not None:
            raise BenchError(f"knnper.temperature applies to kernel=softmax_sq; kernel=exp_l2 weighs neighbours "
                             f"by exp(-distance) with no temperature (got temperature={self.cfg.temperature})")

    def temperature(self) -> float:
        """T: `temperature` if set, else the feature dimension (the classifier's in_features, or the
        BatchNorm's num_features with features = "pre_norm") * scale. 1.0 with kernel = "exp_l2",
        which has none (a set temperature is refused)."""
        cfg = self.cfg
        if cfg.kernel == "exp_l2":
            self._check_kernel()
            return 1.0
        layer = self.feature_layer()
        dim = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.num_features
        t = cfg.temperature if cfg.temperature is not None else dim * cfg.scale
        if not t > 0:
            raise BenchError(f"knnper: the kernel temperature must be > 0, got {t} "
                             f"(temperature={cfg.temperature}, scale={cfg.scale})")
        return float(t)

    @torch.no_grad()
    def _datastore(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, labels): one key per scored token of the training split (methods.train.as_rows):
        an example's embedding, or with per-position targets every position's embedding.
        store_mode = "train": one train-mode forward of the whole split, the network's buffers put
        back afterwards (the module docstring)."""
        net, at = self.net, self.feature_layer()
        if self.cfg.store_mode == "train":
            saved = {k: v.clone() for k, v in net.state_dict().items()}
            net.train()
            try:
                feats, _ = features_and_logits(net, x, at)
            finally:
                load(net, saved)  # the running statistics that forward updated: discarded, as the reference
                net.eval()
            return as_rows(feats, y)
        keys, labels = [], []
        for s in range(0, int(x.shape[0]), EVAL_CHUNK):
            feats, _ = features_and_logits(net, x[s : s + EVAL_CHUNK], at)
            k, lab = as_rows(feats, y[s : s + EVAL_CHUNK])
            keys.append(k)
            labels.append(lab)
        return torch.cat(keys), torch.cat(labels)

    @torch.no_grad()
    def _correct_and_loss(self, keys, labels, x, y) -> tuple[int, float]:
        """(number correct, summed NLL of the mixed probability) over scored tokens, in methods.train's
        chunks; each query row is a token (an example when there is one label per example)."""
        cfg, net = self.cfg, self.net
        temperature, at = self.temperature(), self.feature_layer()
        correct, loss = 0, 0.0
        for s in range(0, int(y.shape[0]), EVAL_CHUNK):
            feats, logits = features_and_logits(net, x[s : s + EVAL_CHUNK], at)
            q, yq = as_rows(feats, y[s : s + EVAL_CHUNK])
            logits, _ = as_rows(logits, y[s : s + EVAL_CHUNK])
            for r in range(0, int(yq.shape[0]), QUERY_ROWS):
                lg, yr = logits[r : r + QUERY_ROWS], yq[r : r + QUERY_ROWS]
                p_knn = None
                if keys is not None:
                    p_knn = knn_probs(q[r : r + QUERY_ROWS], keys, labels, cfg.k, temperature,
                                      lg.shape[1], cfg.kernel).to(lg.dtype)
                log_p = mixed_log_probs(lg, p_knn, cfg.mix)
                correct += int((log_p.argmax(1) == yr).sum())
                loss += float(F.nll_loss(log_p, yr, reduction="sum"))
        return correct, loss

    def evaluate(self, down, state, data, rng):
        net = self.net
        load(net, down)
        eval_mode(net)  # net.eval(), with dropout kept on under the run's eval_dropout
        keys = labels = None
        if data.num_train > 0:
            keys, labels = self._datastore(data.train_x, data.train_y)
        tc, tl = self._correct_and_loss(keys, labels, data.test_x, data.test_y)
        vc, _ = self._correct_and_loss(keys, labels, data.val_x, data.val_y)
        return metrics_from_counts(tc, tl, vc, data)
