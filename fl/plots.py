"""Figures shared by the modelling stages: forest plots, calibration, decision curves, sweeps."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fl.evaluate import calibration_curve, net_benefit


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
            curve = calibration_curve(labels[site], predictions[model][site])
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
            curve = net_benefit(labels[site], predictions[model][site], thresholds)
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


def learning_curves(history: pd.DataFrame, reference: dict[str, float] | None = None):
    """Return test AUROC per round for each strategy, one panel per site (dashed: pooled model)."""
    sites = list(dict.fromkeys(history["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.4 * len(sites), 3.6), sharey=True)
    for ax, site in zip(np.atleast_1d(axes), sites):
        rows = history.loc[history["site"] == site]
        sns.lineplot(data=rows, x="round", y="auroc", hue="strategy", ax=ax, legend=ax is np.atleast_1d(axes)[-1])
        if reference and site in reference:
            ax.axhline(reference[site], color="grey", linestyle="--", linewidth=1, label="pooled (stage 2)")
        ax.set_title(f"test site: {site}")
        ax.set_ylabel("AUROC of the global model")
    np.atleast_1d(axes)[-1].legend(fontsize="small")
    fig.suptitle("Learning curves: the global model after each round, scored at each hospital")
    fig.tight_layout()
    return fig


def selection_curves(curves: dict[str, list[float]], chosen: str, rounds: int):
    """Return federated validation loss per round for every selection candidate (chosen one bold, its round marked)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, linewidth=2.5 if name == chosen else 1,
                label=f"{name} (chosen)" if name == chosen else name)
    ax.axvline(rounds, color="grey", linestyle=":", linewidth=1)
    best = min(min(c) for c in curves.values())
    ax.set_ylim(best - 0.01, best + 0.12)  # diverging candidates leave the frame rather than flatten the rest
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss (example-weighted over sites)")
    ax.set_title("Federated model selection on training data: chosen candidate and its early-stopping round")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


def drift_curves(history: pd.DataFrame):
    """Return each site's local-model distance from the new global model per round, one panel per strategy."""
    rows = history.dropna(subset=["drift"]) if "drift" in history else history.iloc[0:0]
    grid = sns.relplot(data=rows, x="round", y="drift", hue="site", col="strategy", kind="line", marker="o",
                       height=3.0, aspect=1.1)
    grid.set_axis_labels("round", "L2 distance from the global model")
    grid.figure.suptitle("Client drift: how far each hospital's local model ends from the average, per round",
                         y=1.05)
    return grid.figure


def bytes_per_round(table: pd.DataFrame):
    """Return bytes sent per round and direction, summed over sites, for each strategy."""
    totals = table.groupby(["strategy", "round", "direction"], as_index=False)["bytes"].sum()
    grid = sns.relplot(data=totals, x="round", y="bytes", hue="direction", col="strategy", kind="line",
                       marker="o", height=3.0, aspect=1.2)
    grid.set_axis_labels("round (0: federated statistics)", "bytes on the wire")
    grid.figure.suptitle("What crosses the site boundary, per round (from the message ledger)", y=1.05)
    return grid.figure


def _describe_records(rows: pd.DataFrame) -> str:
    parts = []
    for records in rows["records"]:
        for record in records:
            if record["kind"] == "arrays":
                shapes = ", ".join("x".join(str(d) for d in e["shape"]) + f" {e['dtype']}" for e in record["entries"])
                parts.append(f"{record['key']}: {shapes}")
            else:
                names = f"{record['key']}: " + ", ".join(e["name"] for e in record["entries"])
                parts.append(textwrap.fill(names, width=46, subsequent_indent="  "))
        break
    return "\n".join(parts)


def data_flow(ledger: pd.DataFrame):
    """Return a diagram of who sends what to whom, drawn from the ledger of one run."""
    from matplotlib.patches import FancyBboxPatch

    sites = sorted(ledger["site"].unique())
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 6)
    ax.axis("off")

    def box(x, y, text, colour):
        ax.add_patch(FancyBboxPatch((x - 1.3, y - 0.45), 2.6, 0.9, boxstyle="round,pad=0.05", fc=colour, ec="black"))
        ax.text(x, y, text, ha="center", va="center", fontsize=10, weight="bold")

    box(5.5, 5.2, "aggregation server\n(ServerApp)", "#dde8f5")
    positions = np.linspace(2.0, 9.0, len(sites))
    first_train = ledger.loc[ledger["message_type"] == "train"]
    round_one = first_train["round"].min() if len(first_train) else 1
    for x, site in zip(positions, sites):
        box(x, 0.8, f"{site}\n(ClientApp + records)", "#f5e6dd")
        out = ledger.loc[(ledger["site"] == site) & (ledger["direction"] == "server->site") & (ledger["message_type"] == "train") & (ledger["round"] == round_one)]
        back = ledger.loc[(ledger["site"] == site) & (ledger["direction"] == "site->server") & (ledger["message_type"] == "train") & (ledger["round"] == round_one)]
        ax.annotate("", xy=(x - 0.25, 1.3), xytext=(5.5 - 0.3, 4.7), arrowprops=dict(arrowstyle="->", color="C0"))
        ax.annotate("", xy=(5.5 + 0.3, 4.7), xytext=(x + 0.25, 1.3), arrowprops=dict(arrowstyle="->", color="C1"))
        per_round = ledger.loc[ledger["site"] == site].groupby("direction")["bytes"].sum()
        text = (f"down, per round: {int(out['bytes'].sum()):,} B\n{_describe_records(out)}\n\n"
                f"up, per round: {int(back['bytes'].sum()):,} B\n{_describe_records(back)}\n"
                f"whole run: {int(per_round.sum()):,} B")
        ax.text(x, 3.0, text, ha="center", va="center", fontsize=7, family="monospace",
                bbox=dict(fc="white", ec="grey", alpha=0.9))
    ax.text(5.5, 5.85, "Patient records never leave a hospital; only the items listed travel "
            "(weights, aggregate statistics, settings, metrics).", ha="center", fontsize=9)
    return fig


def attack_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str):
    """Return membership-inference ROC curves on log-log axes (the low-FPR regime is what matters)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=name)
    grid = np.logspace(-5, 0, 50)
    ax.plot(grid, grid, color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def exposure_histogram(values: pd.Series, bins: int = 40):
    """Return a histogram of per-patient exposure; bins holding fewer than 5 patients are not drawn."""
    from compendium.disclosure import is_small

    counts, edges = np.histogram(values.to_numpy(), bins=bins)
    shown = np.where(is_small(counts), 0, counts)
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.bar(edges[:-1], shown, width=np.diff(edges), align="edge", color="C0")
    ax.set_xlabel("score gap (member minus non-member)")
    ax.set_ylabel("patients")
    ax.set_title("Per-patient exposure (bins under 5 patients not shown)")
    fig.tight_layout()
    return fig


def dp_frontier(frontier: pd.DataFrame, sites: tuple[str, ...]):
    """Return AUROC per site against epsilon (log scale), with the attack's TPR at 1% FPR beside it."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for site in sites:
        left.plot(frontier["epsilon"], frontier[f"auroc_{site}"], marker="o", label=site)
    left.set_xscale("log")
    left.set_xlabel("epsilon (delta as stated)")
    left.set_ylabel("AUROC (test split)")
    left.set_title("Utility under DP-SGD")
    left.legend(fontsize="small")
    right.plot(frontier["epsilon"], frontier["attack_tpr_at_1pct_fpr"], marker="o", label="loss attack")
    right.plot(frontier["epsilon"], frontier["bound_at_1pct_fpr"], linestyle="--", color="grey", label="DP bound")
    right.axhline(0.01, color="black", linewidth=0.8, linestyle=":", label="chance")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("epsilon")
    right.set_ylabel("TPR at 1% FPR")
    right.set_title("Attack success against the bound")
    right.legend(fontsize="small")
    fig.tight_layout()
    return fig


def dp_audit(audit_rows: list[dict]):
    """Return, per audited configuration, the accounted epsilon beside the audit's 95% lower bound and its ceiling.

    `audit_rows`: `fl.privacy.audit.AuditResult.as_dict()` of each configuration, in order.
    """
    fig, ax = plt.subplots(figsize=(9, 3.4))
    positions = np.arange(len(audit_rows))
    accounted = [row["epsilon"] for row in audit_rows]
    lower = [row["epsilon_lower_bound"] for row in audit_rows]
    ax.scatter(positions, accounted, marker="o", label="accounted epsilon (upper bound)")
    ax.scatter(positions, lower, marker="^", label="audit: 95% lower bound")
    ax.plot(positions, [row["audit_ceiling"] for row in audit_rows], linestyle="--", color="grey",
            label="most the audit can show")
    for x, row in zip(positions, audit_rows):
        ax.annotate(row["verdict"], (x, max(row["epsilon"], row["epsilon_lower_bound"])), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize="x-small")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(positions, [row["audit"] for row in audit_rows], rotation=15, ha="right", fontsize="x-small")
    ax.set_ylabel("epsilon")
    ax.set_title("DP-SGD: accounted epsilon and the audit's lower bound")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def per_round_exposure(table: pd.DataFrame):
    """Return, per site, the server's (position C) membership signal in each round's update: AUC and TPR at 1% FPR."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for site, rows in table.groupby("victim site", sort=True):
        left.plot(rows["round"], rows["C: AUC"], marker="o", markersize=3, label=site)
        right.plot(rows["round"], rows["C: TPR@1%FPR"], marker="o", markersize=3, label=site)
    left.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="chance")
    right.axhline(0.01, color="grey", linestyle="--", linewidth=0.8, label="chance")
    left.set_ylabel("AUC")
    right.set_ylabel("TPR at 1% FPR")
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.legend(fontsize="small")
    fig.suptitle("Per-round exposure: the server's membership attack on each site's update")
    fig.tight_layout()
    return fig
