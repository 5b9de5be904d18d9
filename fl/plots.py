"""Figures shared by the modelling stages: forest plots, calibration, decision curves, sweeps."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fl import evaluate as ev


def auroc_forest(metrics: pd.DataFrame, title: str = "AUROC with 95% bootstrap CI on each test site"):
    """Return a forest plot of AUROC (CI) per model, one panel per test site."""
    sites = list(dict.fromkeys(metrics["test_site"]))
    models = list(dict.fromkeys(metrics["model"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 0.45 * len(models) + 1.2), sharey=True)
    for ax, site in zip(np.atleast_1d(axes), sites):
        rows = metrics.loc[metrics["test_site"] == site].set_index("model").loc[models]
        y = np.arange(len(models))[::-1]
        ax.errorbar(rows["auroc"], y, xerr=[rows["auroc"] - rows["auroc_lower"], rows["auroc_upper"] - rows["auroc"]],
                    fmt="o", capsize=3)
        ax.set_yticks(y, models)
        ax.set_title(f"test site: {site}")
        ax.set_xlabel("AUROC")
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def calibration_plots(labels: dict[str, np.ndarray], predictions: dict[str, dict[str, np.ndarray]],
                      models: list[str]):
    """Return observed vs predicted risk by decile, one panel per test site (bins under 5 dropped)."""
    sites = list(labels)
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 4), sharey=True)
    for ax, site in zip(np.atleast_1d(axes), sites):
        for model in models:
            curve = ev.calibration_curve(labels[site], predictions[model][site])
            ax.plot(curve["predicted"], curve["observed"], marker="o", label=model)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        top = 0.7
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_title(f"test site: {site}")
        ax.set_xlabel("predicted risk")
    np.atleast_1d(axes)[0].set_ylabel("observed readmission rate")
    np.atleast_1d(axes)[-1].legend(fontsize="small")
    fig.suptitle("Calibration by decile of predicted risk")
    fig.tight_layout()
    return fig


def decision_curves(labels: dict[str, np.ndarray], predictions: dict[str, dict[str, np.ndarray]],
                    models: list[str], thresholds: np.ndarray):
    """Return net benefit against threshold probability, one panel per test site."""
    sites = list(labels)
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.8), sharey=True)
    for ax, site in zip(np.atleast_1d(axes), sites):
        curve = None
        for model in models:
            curve = ev.net_benefit(labels[site], predictions[model][site], thresholds)
            ax.plot(curve["threshold"], curve["model"], label=model)
        ax.plot(curve["threshold"], curve["treat_all"], color="grey", linestyle="--", label="treat all")
        ax.axhline(0, color="black", linewidth=0.8, label="treat none")
        ax.set_ylim(-0.02, max(0.05, float(labels[site].mean()) + 0.01))
        ax.set_title(f"test site: {site}")
        ax.set_xlabel("threshold probability")
    np.atleast_1d(axes)[0].set_ylabel("net benefit")
    np.atleast_1d(axes)[-1].legend(fontsize="small")
    fig.suptitle("Decision curves: net benefit of acting on the model's risk")
    fig.tight_layout()
    return fig


def size_sweep(sweep: pd.DataFrame):
    """Return AUROC on the smallest site as its training data grow, alone and with partners."""
    long = sweep.melt(id_vars=["fraction", "train_rows", "repeat"], value_vars=["local_auroc", "pooled_auroc"],
                      var_name="model", value_name="auroc")
    long["model"] = long["model"].map({"local_auroc": "site alone", "pooled_auroc": "site + partners (pooled)"})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=long, x="train_rows", y="auroc", hue="model", marker="o", errorbar=("pi", 100), ax=ax)
    ax.set_xscale("log")
    ticks = sorted(sweep["train_rows"].unique())
    ax.set_xticks(ticks, [f"{int(t):,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"training index stays at {sweep['site'].iloc[0]}")
    ax.set_ylabel(f"AUROC on {sweep['site'].iloc[0]} test split")
    ax.set_title("What more data is worth: the case for collaboration")
    fig.tight_layout()
    return fig
