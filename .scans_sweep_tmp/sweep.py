import json, os, sys, time
import torch
from torch import nn
import torch.multiprocessing as mp
sys.path.insert(0, os.getcwd())

SETTINGS = {
    "a50x150": dict(samples=50, steps=150),
    "b50x300": dict(samples=50, steps=300),
    "c100x300": dict(samples=100, steps=300),
    "c100x300s1": dict(samples=100, steps=300, seed=1),
    "d200x1000": dict(samples=200, steps=1000),
    "e200x1000l3": dict(samples=200, steps=1000, lambda_init=1e-3),
    "f450x1000": dict(samples=450, steps=1000),
}

def job(spec, q):
    torch.set_num_threads(1)
    from harness.builtin import DigitsCNN, digits_cnn
    from harness.data import digits_split
    from harness.models import BoundedModel
    from attacks import scans
    frac, seed = spec
    x, y = digits_split("train"); xt, yt = digits_split("test")
    rec = {"frac": frac, "seed": seed}
    if frac == "builtin":
        net = digits_cnn()[0]; xp, yp, pois = x, y, torch.zeros(0, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(seed)
        cand = (y != 0).nonzero().flatten()
        pois = cand[torch.randperm(cand.numel(), generator=g)[: int(frac * len(y))]].sort().values
        xp, yp = x.clone(), y.clone(); xp[pois, :, -3:, -3:] = 1.0; yp[pois] = 0
        torch.manual_seed(seed); net = DigitsCNN(); opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(10):
            for b in torch.randperm(len(y), generator=g).split(64):
                opt.zero_grad(); nn.functional.cross_entropy(net(xp[b]), yp[b]).backward(); opt.step()
    net.eval()
    with torch.no_grad():
        xtt = xt[yt != 0].clone(); xtt[:, :, -3:, -3:] = 1
        rec["asr"] = float((net(xtt).argmax(1) == 0).float().mean()); rec["acc"] = float((net(xt).argmax(1) == yt).float().mean())
    m = BoundedModel(net).to("cuda" if torch.cuda.is_available() else "cpu")
    f = scans.penultimate(m, xp); t = pois.tolist()
    rec["dev"] = str(next(m.parameters()).device)
    for eps in (0.05, 0.1, 0.15, 0.33):
        r = scans.scan_report(scans.spectral_signatures(f, yp, eps=eps).flagged, t)
        rec[f"ss{eps}"] = [r["n_flagged"], r.get("precision"), r.get("recall")]
    for ms in (0.0, 0.25):
        r = scans.scan_report(scans.activation_clustering(f, yp, method="pca", min_silhouette=ms).flagged, t)
        rec[f"ac{ms}"] = [r["n_flagged"], r.get("precision"), r.get("recall")]
    for name, kw in SETTINGS.items():
        r = scans.neural_cleanse(m, xt, yt, num_classes=10, **kw)
        rec[name] = {"idx": r["anomaly_index"], "target": r["target"], "flagged": r["flagged_classes"], "norms": r["norms"],
                     "reached": sum(r["reached"]), "s": r["seconds"]}
    q.put(rec)

if __name__ == "__main__":
    os.environ["HARNESS_CACHE_DIR"] = "/tmp/hc"
    from harness.builtin import digits_cnn
    t0 = time.time(); digits_cnn(); print("builtin trained", time.time() - t0, flush=True)
    specs = [("builtin", 0), (0.0, 1), (0.0, 2)] + [(f, s) for f in (0.05, 0.1) for s in (0, 1, 2)]
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    ps = [ctx.Process(target=job, args=(s, q)) for s in specs]
    for p in ps: p.start()
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "sweep.jsonl"), "w") as fh:
        for _ in specs:
            rec = q.get(); fh.write(json.dumps(rec) + "\n"); fh.flush()
            print(rec["frac"], rec["seed"], "asr", round(rec["asr"], 3), {k: (v["idx"], v["target"], v["s"]) for k, v in rec.items() if k.startswith("S")}, flush=True)
    for p in ps: p.join()
    print("total", time.time() - t0)
