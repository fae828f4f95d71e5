"""Benchmark: the shift stage's statistics on large embedding sets, against reference implementations.

Embeddings: the demo reviews embedded with the bundled all-MiniLM-L6-v2 (that time is measured and
reported separately, per 1,000 texts), resampled with small Gaussian jitter to reach n rows per side.
The "target" side gets a real shift: it is resampled from the post-2015 reviews, the source side from
the pre-2015 ones. A null pair resamples both sides from the pre-2015 reviews.

Timed: every test of `tasks.shift.distribution_tests` (block MMD with normal p-value, domain
classifier with 5-fold CV, text-length and vocabulary KS, group mix), plus the null calibration, at
1k..50k rows per side. Reference implementations on the same embeddings, at sizes they can handle:
hyppo's MMD permutation test (`pip install hyppo`; skipped if absent) and scikit-learn's
LogisticRegression + cross_val_predict classifier two-sample test.

Embedding, timed on every demo review (cold, no cache): regraft's `mean_pooled_embeddings` (length-sorted batches
under a token budget) against sentence-transformers' `SentenceTransformer.encode` (length-sorted batches of 32) on
the same model, and against the physical limit: the encoder's FLOPs on those texts' tokens over this machine's
measured fp32 matmul peak, the faster of torch's matmul and oneDNN's (embedding_limit_fraction: that limit over
regraft's time; up to stop 49 the peak was torch's matmul alone, ~15% below oneDNN's on AMD EPYC, so earlier
fractions are not comparable). On a machine where regraft embeds in bf16 that fraction passes 1;
embedding_fp32_limit_fraction times regraft's embedding in fp32 (what an fp32-only CPU runs), after the others, so the
fp32 path is measured against its limit on any CPU; the peak is measured right before and right after that pass and
averaged (matmul_peaks_fp32_flops, per library).

Prints one JSON object last with top-level keys seconds_20k (all tests, 20k vs 20k) and
embedding_seconds_per_1000_texts.

    python benchmarks/shift.py [--sizes 1000 5000 20000 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # finetune.py's matmul peak
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402


def resample(embeddings: torch.Tensor, frame: pd.DataFrame, n: int, seed: int, jitter: float = 0.01):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(frame), n)
    noisy = embeddings[torch.as_tensor(idx)] + jitter * torch.randn(n, embeddings.shape[1],
                                                                   generator=torch.Generator().manual_seed(seed))
    return noisy, frame.iloc[idx].reset_index(drop=True), idx


def sample_for(embeddings, frame, lengths, pieces, idx, groups):
    from tasks.shift import Sample

    return Sample(embeddings=embeddings, lengths=lengths[idx], pieces_per_word=pieces[idx],
                  groups={g: frame[g].astype("str").to_numpy() for g in groups}, labels=None)


def reference_c2st(x: torch.Tensor, y: torch.Tensor, folds: int = 5) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = torch.cat([x, y]).numpy()
    truth = np.r_[np.zeros(len(x)), np.ones(len(y))]
    start = time.perf_counter()
    scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)), features, truth,
                               cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(truth, scores)), time.perf_counter() - start


def reference_mmd(x: torch.Tensor, y: torch.Tensor, reps: int = 200) -> tuple[float, float] | None:
    try:
        from hyppo.ksample import MMD
    except ImportError:
        return None
    start = time.perf_counter()
    _, p_value = MMD().test(x.double().numpy(), y.double().numpy(), reps=reps, workers=1)
    return float(p_value), time.perf_counter() - start


def encoder_flops(config, lengths: np.ndarray) -> float:
    """Forward FLOPs of a BERT-style encoder on texts of these token lengths: per token and layer the four
    attention projections and the two feed-forward matrices (2 FLOPs per multiply-add), plus the attention
    scores and weighted sum over the text's own tokens (no padding)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return float(layers * np.sum(lengths * (2 * (4 * d * d + 2 * d * f) + 4 * lengths * d)))


def compare_embedding(spec: str, texts: list[str], max_length: int) -> tuple[dict, torch.Tensor]:
    """Seconds per 1,000 texts: regraft, its previous fixed batches of 64, sentence-transformers, the limit;
    with regraft's embeddings."""
    from sentence_transformers import SentenceTransformer

    from finetune import matmul_peaks
    from tasks.devices import choose_runtime, fp32_linears_on_onednn
    from tasks.models import load_encoder, load_tokenizer, mean_pooled_embeddings, resolve_model, tokenize

    def per_1000(seconds: float) -> float:
        return round(1000 * seconds / len(texts), 2)

    start = time.perf_counter()
    ours = mean_pooled_embeddings(spec, texts, max_length, cache_dir=None)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # The fewest passes of at most 64 rows, padded within each (a pass priced above any padding): fixed batches.
    mean_pooled_embeddings(spec, texts, max_length, cache_dir=None, batch_size=64, max_tokens=10**9,
                           overhead_tokens=10**9)
    fixed_seconds = time.perf_counter() - start

    model = SentenceTransformer(str(resolve_model(spec)), device="cpu")
    model.max_seq_length = max_length
    start = time.perf_counter()
    theirs = model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=False)
    theirs_seconds = time.perf_counter() - start
    agreement = torch.nn.functional.cosine_similarity(ours, theirs.float().cpu()).min()

    # The fp32 path on its own, after the same warm-up on every machine (what an fp32-only CPU runs; on a GPU this
    # figure would be the GPU's fp32 against the CPU's limit, so it is not given there).
    # The peak right before and right after that pass, averaged: the machine's speed drifts within minutes here, so
    # the limit is priced in the same minutes as the time it is compared with.
    # The peak is the fastest library's (torch's matmul or oneDNN's): the limit is the machine's, not one library's.
    fp32_seconds = None
    peaks = [matmul_peaks(torch.float32)]
    if choose_runtime().device.type == "cpu":
        start = time.perf_counter()
        mean_pooled_embeddings(spec, texts, max_length, cache_dir=None, runtime=choose_runtime("fp32"))
        fp32_seconds = time.perf_counter() - start
        peaks.append(matmul_peaks(torch.float32))

    lengths = np.array([len(ids) for ids in tokenize(load_tokenizer(spec), texts, max_length)])
    mean_peaks = {name: float(np.mean([measured[name] for measured in peaks])) for name in peaks[0]}
    fastest = max(mean_peaks, key=mean_peaks.get)
    peak = mean_peaks[fastest]
    limit_seconds = encoder_flops(load_encoder(spec).config, lengths) / peak
    figures = {"embedding_seconds_per_1000_texts": per_1000(ours_seconds),
            "embedding_fixed64_seconds_per_1000_texts": per_1000(fixed_seconds),
            "embedding_baseline": "sentence-transformers SentenceTransformer.encode, batch_size 32",
            "embedding_baseline_seconds_per_1000_texts": per_1000(theirs_seconds),
            "embedding_speedup_vs_baseline": round(theirs_seconds / ours_seconds, 3),
            "embedding_min_cosine_vs_baseline": round(float(agreement), 5),
            "embedding_limit_seconds_per_1000_texts": per_1000(limit_seconds),
            "embedding_limit_fraction": round(limit_seconds / ours_seconds, 3),
            "embedding_fp32_seconds_per_1000_texts": per_1000(fp32_seconds) if fp32_seconds else None,
            "embedding_fp32_limit_fraction": round(limit_seconds / fp32_seconds, 3) if fp32_seconds else None,
            "embedding_mean_tokens": round(float(lengths.mean()), 1),
            "fp32_linears_on_onednn": fp32_linears_on_onednn(choose_runtime("fp32")),
            "matmul_peak_fp32_flops": round(peak),
            "matmul_peak_fp32_library": fastest,
            "matmul_peaks_fp32_flops": {name: [round(measured[name]) for measured in peaks] for name in peaks[0]}}
    return figures, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000])
    parser.add_argument("--reference-sizes", type=int, nargs="+", default=[500, 1000, 2000])
    args = parser.parse_args()

    from tasks.config import load_params
    from tasks.devices import machine_summary
    from tasks.ingest import ingest
    from tasks.models import load_tokenizer
    from tasks.shift import calibrate, classifier_test, decide, distribution_tests, mmd_test, text_profile

    params = load_params(ROOT / "params.yaml")
    cfg, labels = params.shift, params.ingest.labels
    splits = ingest(params.ingest).splits
    frame = pd.concat(list(splits.values()), ignore_index=True)
    is_target = (frame["timestamp"] >= pd.Timestamp(params.ingest.split.time_cutoff, tz="UTC")).to_numpy()
    texts = frame["text"].tolist()
    embedding, embeddings = compare_embedding(params.model.base, texts, params.model.max_length)
    print(json.dumps(embedding), flush=True)
    lengths, pieces, _ = text_profile(load_tokenizer(params.model.base), texts)
    groups = params.ingest.columns.groups

    source_rows, target_rows = np.flatnonzero(~is_target), np.flatnonzero(is_target)

    def pair(n: int, seed: int, shifted: bool):
        sx, sframe, sidx = resample(embeddings[torch.as_tensor(source_rows)], frame.iloc[source_rows], n, seed)
        other = target_rows if shifted else source_rows
        tx, tframe, tidx = resample(embeddings[torch.as_tensor(other)], frame.iloc[other], n, seed + 1)
        return (sample_for(sx, sframe, lengths[source_rows], pieces[source_rows], sidx, groups),
                sample_for(tx, tframe, lengths[other], pieces[other], tidx, groups))

    scaling = []
    for n in args.sizes:
        source, target = pair(n, 0, shifted=True)
        start = time.perf_counter()
        results, _ = distribution_tests(source, target, cfg, labels, seed=0)
        tests_seconds = time.perf_counter() - start
        start = time.perf_counter()
        cutoffs = calibrate(source, cfg, labels)
        calibration_seconds = time.perf_counter() - start
        verdict, _ = decide(results, cutoffs, cfg)
        row = {"n_per_side": n, "tests_seconds": round(tests_seconds, 2),
               "calibration_seconds": round(calibration_seconds, 2),
               "total_seconds": round(tests_seconds + calibration_seconds, 2), "verdict_on_shifted": verdict,
               "mmd_method": results[0].detail["method"]}
        print(json.dumps(row), flush=True)
        scaling.append(row)

    # Power and time against the references, on the same embeddings, at sizes the references can run.
    comparison = []
    for n in args.reference_sizes:
        for shifted in (False, True):
            hits = {"regraft_mmd": 0, "regraft_classifier": 0, "reference_mmd": 0, "reference_classifier": 0}
            times = {k: 0.0 for k in hits}
            trials = 5
            ref_mmd_ran = True
            for seed in range(trials):
                source, target = pair(n, 100 + seed, shifted)
                t = time.perf_counter()
                hits["regraft_mmd"] += mmd_test(source.embeddings, target.embeddings, cfg, seed).p_value < cfg.alpha
                times["regraft_mmd"] += time.perf_counter() - t
                t = time.perf_counter()
                result, _ = classifier_test(source.embeddings, target.embeddings, cfg.classifier_folds, seed)
                hits["regraft_classifier"] += result.p_value < cfg.alpha
                times["regraft_classifier"] += time.perf_counter() - t
                auc, seconds = reference_c2st(source.embeddings, target.embeddings, cfg.classifier_folds)
                # The same Mann-Whitney normal approximation turns the reference's AUC into a p-value.
                p_ref = float(stats.norm.sf((auc - 0.5) / np.sqrt((2 * n + 1) / (12 * n * n))))
                hits["reference_classifier"] += p_ref < cfg.alpha
                times["reference_classifier"] += seconds
                ref = reference_mmd(source.embeddings, target.embeddings) if n <= 2000 else None
                if ref is None:
                    ref_mmd_ran = False
                else:
                    hits["reference_mmd"] += ref[0] < cfg.alpha
                    times["reference_mmd"] += ref[1]
            row = {"n_per_side": n, "shifted": shifted, "trials": trials,
                   **{f"{k}_rejections": int(v) for k, v in hits.items() if ref_mmd_ran or k != "reference_mmd"},
                   **{f"{k}_seconds": round(v / trials, 3) for k, v in times.items() if ref_mmd_ran or k != "reference_mmd"}}
            print(json.dumps(row), flush=True)
            comparison.append(row)

    at_20k = next((r for r in scaling if r["n_per_side"] == 20000), None)
    summary = {
        "benchmark": "shift",
        "machine": machine_summary(),
        **embedding,
        "scaling": scaling,
        "reference_comparison": comparison,
        "reference_mmd": "hyppo.ksample.MMD (permutation, 200 reps)" if reference_mmd(torch.zeros(4, 2), torch.ones(4, 2), 5)
        else "hyppo not installed: pip install hyppo",
        "reference_classifier": "scikit-learn LogisticRegression + cross_val_predict, AUC",
        # All tests (statistics and p-values) on 20k vs 20k. The null calibration depends on the source
        # alone (it splits source rows in halves), so it is reported on its own.
        "seconds_20k": at_20k["tests_seconds"] if at_20k else None,
        "calibration_seconds_20k": at_20k["calibration_seconds"] if at_20k else None,
        "seconds_20k_with_calibration": at_20k["total_seconds"] if at_20k else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
