"""Audio-text retrieval (Clotho, AudioCaps): captions as targets, symmetric InfoNCE, LAION's metric.

A target is the clip each caption describes; the text side is the split's captions; the loss is CLIP's
symmetric InfoNCE over (clip, caption) pairs, one caption drawn per clip and epoch (`tasks.loss`); the
selection metric is validation mean R@1 (the mean of both directions' R@1). A stored row carries both
directions' metrics (`t2a_r1`, `a2t_map10`, ...).

The metric is LAION-CLAP's `evaluate_clotho_audiocaps` (src/laion_clap/training/train.py), with several
captions per clip:
- text→audio: every caption is a query; its rank is the position of its clip among all clips.
  R@k = share of queries ranked < k; mAP@10 = mean of 1/(rank+1) over queries ranked < 10, else 0;
  mean rank = mean(rank) + 1, median rank = floor(median(rank)) + 1.
- audio→text: every clip is a query over all captions; R@k is a hit when *any* of its captions ranks
  < k (rank = the best rank among them). mAP@10 is average precision at 10 over the clip's captions:
  the ranks under 10, sorted, contribute (j / (rank_j + 1)) for the j-th of them, summed and divided by
  the clip's caption count (Mei et al.'s definition that LAION's docstring cites: `a2t_map10`). LAION's
  code omits the sort, which overstates the figure when a later caption outranks an earlier one (it can
  exceed 1); its tables were computed so, and `a2t_map10_laion` reports that value beside ours.
Ranks are 0-based here and count ties in favour of the lower index (a stable descending sort).

The score matrix is never materialised: the text→audio pass streams blocks of caption columns
(all clips × `block` captions) and the audio→text pass streams blocks of clip rows (`block` clips × all
captions). Each rank is read from the same block that holds the true pair's score, so a rank never
depends on two float computations of one score agreeing. Memory is O(block · N), whatever N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from audio_residual.tasks.base import Task, TrainBatch
from audio_residual.tasks.loss import pair_infonce

# scorer(audio rows, caption columns) -> scores (rows, columns): larger means a better match.
Scorer = Callable[[slice, slice], torch.Tensor]

KS = (1, 5, 10)
DIRECTIONS = {"t2a": "text_to_audio", "a2t": "audio_to_text"}


@dataclass(frozen=True)
class RetrievalRanks:
    """0-based ranks: `t2a[q]` of caption q's clip among all clips, `a2t[q]` of caption q among all
    captions for its clip's query; `caption_clip[q]` is the clip caption q describes."""

    t2a: np.ndarray
    a2t: np.ndarray
    caption_clip: np.ndarray
    n_audio: int

    def best_a2t(self) -> np.ndarray:
        """(n_audio,) the best rank among each clip's captions: LAION's audio→text rank."""
        best = np.full(self.n_audio, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, self.caption_clip, self.a2t)
        return best


def check_caption_clip(caption_clip, n_audio: int) -> np.ndarray:
    """`caption_clip` as int64; a ValueError naming the problem if a caption points nowhere or a clip
    has no caption (its audio→text query would have no answer)."""
    clips = np.asarray(caption_clip)
    if clips.ndim != 1 or not np.issubdtype(clips.dtype, np.integer):
        raise ValueError(f"caption_clip must be a 1-D integer array of clip indices, got {clips.dtype} {clips.shape}")
    if n_audio == 0 or len(clips) == 0:
        raise ValueError(f"retrieval needs clips and captions, got {n_audio} clips and {len(clips)} captions")
    if clips.min() < 0 or clips.max() >= n_audio:
        raise ValueError(f"caption_clip holds clip indices outside 0..{n_audio - 1}")
    orphans = np.flatnonzero(np.bincount(clips, minlength=n_audio) == 0)
    if len(orphans):
        raise ValueError(f"{len(orphans)} clip(s) have no caption (first: index {orphans[0]}): drop them first")
    return clips.astype(np.int64)


def dot_scorer(audio_emb: torch.Tensor, text_emb: torch.Tensor, normalize: bool = True) -> Scorer:
    """Cosine (or, with normalize=False, dot-product) scores of embedding rows, computed per block."""
    audio = torch.as_tensor(audio_emb).float()
    text = torch.as_tensor(text_emb).float()
    if audio.ndim != 2 or text.ndim != 2 or audio.shape[1] != text.shape[1]:
        raise ValueError(f"audio {tuple(audio.shape)} and text {tuple(text.shape)} embeddings must be (n, D) alike")
    if normalize:
        audio, text = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    return lambda rows, cols: audio[rows] @ text[cols].T


def _rank_of(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """Per row of `scores`, the 0-based position of column `true_index` in a stable descending sort."""
    true = scores.gather(1, true_index[:, None])
    above = (scores > true).sum(1)
    order = torch.arange(scores.shape[1], device=scores.device)[None]
    tied_before = ((scores == true) & (order < true_index[:, None])).sum(1)
    return above + tied_before


@torch.no_grad()
def retrieval_ranks(scorer: Scorer, n_audio: int, caption_clip, block: int = 256) -> RetrievalRanks:
    """Both directions' ranks in two streamed passes of at most `block` queries each."""
    if block < 1:
        raise ValueError(f"block must be a positive number of rows, got {block}")
    clips = check_caption_clip(caption_clip, n_audio)
    n_text = len(clips)
    clip_t = torch.as_tensor(clips)
    t2a = np.empty(n_text, dtype=np.int64)
    quiet = n_text + n_audio <= 8 * block  # a bar only where the passes take many blocks
    for start in tqdm(range(0, n_text, block), desc="retrieval text→audio", leave=False, disable=quiet):
        cols = slice(start, min(start + block, n_text))
        scores = scorer(slice(0, n_audio), cols).T  # (captions, clips)
        t2a[cols] = _rank_of(scores, clip_t[cols].to(scores.device)).cpu().numpy()
    # Captions of each clip, padded to the largest caption count (padding repeats a real caption).
    order = np.argsort(clips, kind="stable")
    counts = np.bincount(clips, minlength=n_audio)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.minimum(np.arange(counts.max())[None], counts[:, None] - 1)
    captions_of = torch.as_tensor(order[starts[:, None] + slot])  # (n_audio, max captions)
    a2t = np.empty(n_text, dtype=np.int64)
    for start in tqdm(range(0, n_audio, block), desc="retrieval audio→text", leave=False, disable=quiet):
        rows = slice(start, min(start + block, n_audio))
        scores = scorer(rows, slice(0, n_text))  # (clips, captions)
        for s in range(captions_of.shape[1]):
            wanted = captions_of[rows, s]
            a2t[wanted.numpy()] = _rank_of(scores, wanted.to(scores.device)).cpu().numpy()
    return RetrievalRanks(t2a=t2a, a2t=a2t, caption_clip=clips, n_audio=n_audio)


def random_recall(n_audio: int, caption_clip, k: int) -> dict[str, float]:
    """Expected R@k of a random ranking: k/N text→audio; audio→text, the chance that any of a clip's c
    captions among the T falls in the top k (1 − C(T−c, k)/C(T, k)), averaged over clips."""
    clips = np.asarray(caption_clip)
    n_text = len(clips)
    counts = np.bincount(clips, minlength=n_audio)
    miss = np.ones(n_audio)
    for i in range(min(k, n_text)):
        miss *= np.clip((n_text - counts - i) / (n_text - i), 0.0, None)
    return {"t2a": min(k, n_audio) / n_audio, "a2t": float(np.mean(1.0 - miss))}


def _a2t_map10(ranks: RetrievalRanks, sort: bool = True) -> float:
    """Average precision at 10 per clip: the j-th of a clip's caption ranks under 10 contributes
    j / (rank_j + 1), summed and divided by the clip's caption count.

    sort=True ranks a clip's captions first (the definition). sort=False keeps their given order, as LAION's
    code does (`evaluate_clotho_audiocaps`, reimplemented from its description): a caption that outranks an
    earlier one is then paired with a larger j, so that value is never below the sorted one (equal when the
    captions already come in rank order) and can exceed 1."""
    if sort:
        order = np.lexsort((ranks.a2t, ranks.caption_clip))  # by clip, then by rank
    else:
        order = np.argsort(ranks.caption_clip, kind="stable")  # by clip, captions in their given order
    clip, rank = ranks.caption_clip[order], ranks.a2t[order]
    hit = rank < 10
    counts = np.bincount(clip, minlength=ranks.n_audio)
    hits_before = np.cumsum(hit) - hit  # hits among all earlier captions of the array
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    j = hits_before - hits_before[first[clip]] + 1  # 1-based position among the clip's captions under 10
    precision = np.where(hit, j / (rank + 1), 0.0)
    return float(np.mean(np.bincount(clip, weights=precision, minlength=ranks.n_audio) / counts))


def metrics_from_ranks(ranks: RetrievalRanks, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k, mAP@10, mean and median rank per direction (`t2a_r1`, `a2t_map10`, ...), LAION's code's
    audio→text mAP@10 (`a2t_map10_laion`), the selection metric `mean_r1`, each R@k's random baseline
    (`t2a_random_r1`, ...) and the query counts."""
    out: dict[str, float] = {"n_audio": ranks.n_audio, "n_text": len(ranks.t2a)}
    per_query = {"t2a": ranks.t2a, "a2t": ranks.best_a2t()}
    for key, r in per_query.items():
        for k in ks:
            out[f"{key}_r{k}"] = float(np.mean(r < k))
        out[f"{key}_mean_rank"] = float(r.mean() + 1)
        out[f"{key}_median_rank"] = float(np.floor(np.median(r)) + 1)
    out["t2a_map10"] = float(np.mean(np.where(ranks.t2a < 10, 1.0 / (ranks.t2a + 1), 0.0)))
    out["a2t_map10"] = _a2t_map10(ranks)
    out["a2t_map10_laion"] = _a2t_map10(ranks, sort=False)
    for k in ks:
        for key, value in random_recall(ranks.n_audio, ranks.caption_clip, k).items():
            out[f"{key}_random_r{k}"] = value
    out["mean_r1"] = (out["t2a_r1"] + out["a2t_r1"]) / 2
    return out


def retrieval_metrics(
    audio_emb: torch.Tensor, text_emb: torch.Tensor, caption_clip, block: int = 256, normalize: bool = True
) -> dict[str, float]:
    """LAION's retrieval metrics of (n_audio, D) clip and (n_text, D) caption embeddings, caption q
    describing clip `caption_clip[q]`; cosine scores unless normalize=False. See `metrics_from_ranks`."""
    scorer = dot_scorer(audio_emb, text_emb, normalize=normalize)
    return metrics_from_ranks(retrieval_ranks(scorer, len(audio_emb), caption_clip, block=block))


@torch.no_grad()
def top_captions(scorer: Scorer, clips: Sequence[int], n_text: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """For the given clips, the indices (len(clips), k) and scores of their k best captions."""
    rows = torch.as_tensor(np.asarray(clips, dtype=np.int64))
    scores = torch.cat([scorer(slice(int(i), int(i) + 1), slice(0, n_text)) for i in rows])
    top = scores.topk(min(k, n_text), dim=1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def caption_positions(caption_clip: np.ndarray, n_clips: int) -> list[np.ndarray]:
    """Per clip position, the indices of its captions."""
    order = np.argsort(caption_clip, kind="stable")
    bounds = np.searchsorted(caption_clip[order], np.arange(n_clips + 1))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


DIRECTION_METRICS = ("r1", "r5", "r10", "map10", "mean_rank", "median_rank")


class Retrieval(Task):
    name = "retrieval"
    metrics = (
        "mean_r1",
        *(f"{d}_{m}" for d in DIRECTIONS for m in DIRECTION_METRICS),
        "a2t_map10_laion",
        *(f"{d}_random_r{k}" for d in DIRECTIONS for k in KS),
    )
    selection_metric = "mean_r1"
    report_columns = (("T→A R@1", "t2a_r1"), ("A→T R@1", "a2t_r1"), ("T→A R@10", "t2a_r10"),
                      ("A→T R@10", "a2t_r10"), ("T→A mAP@10", "t2a_map10"), ("A→T mAP@10", "a2t_map10"),
                      ("A→T mAP@10 (LAION's code)", "a2t_map10_laion"), ("random R@1 (T→A)", "t2a_random_r1"))  # fmt: skip
    captioned = True
    has_examples = True
    figure_metrics = {"t2a_r1": "t2a_random_r1", "a2t_r1": "a2t_random_r1"}
    block = 256  # queries per streamed block of the metric

    def targets(self, ws, rows: np.ndarray) -> np.ndarray:
        """Per caption of the clips `rows`, the position of its clip in `rows`."""
        return ws.table.caption_pairs(rows)[1]

    def texts(self, ws, rows: np.ndarray) -> list[str]:
        """The captions of the clips `rows`, clip by clip."""
        return ws.table.caption_pairs(rows)[0]

    def batches(self, ws, rows: np.ndarray, batch_size: int):
        """Per epoch: clips in a drawn order, one drawn caption each (its index among `texts(rows)`), in
        batches of ≥ 2 (a lone pair has no negative)."""
        rows = np.asarray(rows)
        captions = caption_positions(self.targets(ws, rows), len(rows))

        def draw(generator: torch.Generator) -> list[TrainBatch]:
            order = torch.randperm(len(rows), generator=generator).numpy()
            picks = torch.randint(0, 2**31 - 1, (len(order),), generator=generator).numpy()
            chosen = np.array([captions[i][p % len(captions[i])] for i, p in zip(order, picks, strict=True)])
            out = [TrainBatch(rows[order[s : s + batch_size]], chosen[s : s + batch_size])
                   for s in range(0, len(order), batch_size)]
            return [b for b in out if len(b.rows) > 1]

        return draw

    def text_side(self, ws, rows: np.ndarray) -> torch.Tensor:
        """CLAP's unit embeddings of every caption of `rows` (what `TrainBatch.targets` index)."""
        return ws.text(self.texts(ws, rows))

    def loss(self, audio: torch.Tensor, batch: TrainBatch, text: torch.Tensor, scale) -> torch.Tensor:
        """CLIP's symmetric InfoNCE of the batch's clips against their drawn captions."""
        captions = text[torch.as_tensor(batch.targets)].to(audio.device)
        return pair_infonce(audio.float(), captions, scale)

    def scores(self, ws, audio: torch.Tensor, rows: np.ndarray, texts: torch.Tensor | None = None) -> Scorer:
        """A blockwise cosine scorer of the clips `rows` against all of their captions."""
        return dot_scorer(audio, ws.text(self.texts(ws, rows)) if texts is None else texts)

    def evaluate(self, scores, targets):
        """(metrics of both directions and the selection metric, the ranks as arrays) of test scores: a
        (clips, captions) matrix or a blockwise `Scorer`, with `targets` = each caption's clip position."""
        caption_clip = np.asarray(targets)
        n_audio = int(caption_clip.max()) + 1 if len(caption_clip) else 0
        scorer = scores if callable(scores) else matrix_scorer(torch.as_tensor(scores))
        ranks = retrieval_ranks(scorer, n_audio, caption_clip, self.block)
        metrics = {k: v for k, v in metrics_from_ranks(ranks).items() if not k.startswith("n_")}
        return metrics, {"t2a_ranks": ranks.t2a, "a2t_ranks": ranks.a2t}

    def examples(self, ws, scores, rows: np.ndarray, n: int, k: int = 5) -> list[dict]:
        """For `n` test clips spread over `rows` (scored by the blockwise `scores`): the top-k captions (✓ where
        the clip's own) and the rank of each of its true captions among all test captions."""
        texts, caption_clip = self.texts(ws, rows), self.targets(ws, rows)
        scorer = scores if callable(scores) else matrix_scorer(torch.as_tensor(scores))
        ranks = retrieval_ranks(scorer, len(rows), caption_clip, self.block)
        clips = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))
        indices, values = top_captions(scorer, clips, len(texts), k)
        out = []
        for clip, top, top_scores in zip(clips, indices, values, strict=True):
            own = np.flatnonzero(caption_clip == clip)
            out.append({
                "clip": ws.table.filenames[rows[clip]],
                "top": [{"caption": texts[i], "score": float(v), "true": bool(caption_clip[i] == clip)}
                        for i, v in zip(top, top_scores, strict=True)],
                "true_ranks": [{"caption": texts[i], "rank": int(ranks.a2t[i]) + 1} for i in own],
            })
        return out

    def examples_markdown(self, examples: list[dict]) -> str:
        lines = []
        for ex in examples:
            lines.append(f"**{ex['method']}**, clip `{ex['clip']}`: true captions ranked "
                         + ", ".join(str(t["rank"]) for t in ex["true_ranks"]))
            lines += [f"{i}. {'✓' if t['true'] else '·'} {t['caption']} ({t['score']:.3f})"
                      for i, t in enumerate(ex["top"], 1)]
            lines.append("")
        return "\n".join(lines)


def matrix_scorer(scores: torch.Tensor) -> Scorer:
    """A whole (clips, captions) score matrix as a blockwise scorer."""
    return lambda rows, cols: scores[rows, cols]


RETRIEVAL = Retrieval()
