"""kNN-Per: Marfoq, Neglia, Vidal, Kameni, "Personalized Federated Learning through Local
Memorization", ICML 2022, arXiv 2111.09360 (reference code: github.com/omarfoq/knn-per,
client.py `KNNPerClient`, datastore.py).

A global model is trained by FedAvg; each client personalizes it at inference time by interpolating
its prediction with a k-nearest-neighbour model over a local datastore of embeddings.

    Training: FedAvg exactly (methods/fedavg.py): w_i <- w; local_epochs of SGD; w <- sum_i n_i w_i / sum_i n_i
    Eval, client i with the global w:
        datastore   S_i = {(phi(x_j), y_j) : (x_j, y_j) in the client's TRAIN split}
        embedding   phi(x) = the input of the model's final Linear classifier (= body(x) for
                    mlp / cnn / resnet, whose head is that Linear)
        distance    d(x, x_j) = ||phi(x) - phi(x_j)||^2       (squared L2, the reference's faiss IndexFlatL2)
        p_kNN(y|x)  = sum_{j in N_k(x)} softmax_j(-d(x, x_j) / temperature) 1[y_j = y]
                      over the k nearest neighbours N_k(x) (the paper's
                      p_kNN(y|x) ∝ sum_j 1[y_j = y] exp(-d(x, x_j) / T), normalized)
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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedeq_bench.core.errors import BenchError
from fedeq_bench.core.ranges import ranged
from fedeq_bench.methods.base import MethodConfig, register_method
from fedeq_bench.methods.fedavg import FedAvg
from fedeq_bench.methods.nets import features_and_logits, final_linear
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


def knn_probs(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, k: int,
              temperature: float, num_classes: int) -> torch.Tensor:
    """p_kNN (N, C): softmax over -d/temperature of the k nearest keys' squared L2 distances d,
    summed per label. `k` is capped at the number of keys (there must be at least one)."""
    # Pairwise, without the matrix-product shortcut: exact per pair whatever the chunk size.
    d = torch.cdist(query, keys, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    dist, idx = torch.topk(d, min(int(k), keys.shape[0]), dim=1, largest=False)
    weights = torch.softmax(-dist / temperature, dim=1)
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

    def temperature(self) -> float:
        """T: `temperature` if set, else the feature dimension (final Linear's in_features) * scale."""
        cfg = self.cfg
        t = cfg.temperature if cfg.temperature is not None else final_linear(self.net).in_features * cfg.scale
        if not t > 0:
            raise BenchError(f"knnper: the kernel temperature must be > 0, got {t} "
                             f"(temperature={cfg.temperature}, scale={cfg.scale})")
        return float(t)

    @torch.no_grad()
    def _datastore(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, labels): one key per scored token of the training split (methods.train.as_rows):
        an example's embedding, or with per-position targets every position's embedding."""
        keys, labels = [], []
        for s in range(0, int(x.shape[0]), EVAL_CHUNK):
            feats, _ = features_and_logits(self.net, x[s : s + EVAL_CHUNK])
            k, lab = as_rows(feats, y[s : s + EVAL_CHUNK])
            keys.append(k)
            labels.append(lab)
        return torch.cat(keys), torch.cat(labels)

    @torch.no_grad()
    def _correct_and_loss(self, keys, labels, x, y) -> tuple[int, float]:
        """(number correct, summed NLL of the mixed probability) over scored tokens, in methods.train's
        chunks; each query row is a token (an example when there is one label per example)."""
        cfg, net = self.cfg, self.net
        temperature = self.temperature()
        correct, loss = 0, 0.0
        for s in range(0, int(y.shape[0]), EVAL_CHUNK):
            feats, logits = features_and_logits(net, x[s : s + EVAL_CHUNK])
            q, yq = as_rows(feats, y[s : s + EVAL_CHUNK])
            logits, _ = as_rows(logits, y[s : s + EVAL_CHUNK])
            for r in range(0, int(yq.shape[0]), QUERY_ROWS):
                lg, yr = logits[r : r + QUERY_ROWS], yq[r : r + QUERY_ROWS]
                p_knn = None
                if keys is not None:
                    p_knn = knn_probs(q[r : r + QUERY_ROWS], keys, labels, cfg.k, temperature,
                                      lg.shape[1]).to(lg.dtype)
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
