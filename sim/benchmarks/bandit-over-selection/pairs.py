import json, random, sys
def boot(xs, B=10000, seed=1):
    rng = random.Random(seed); n = len(xs)
    ms = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(B))
    return sum(xs)/n, ms[int(0.025*B)], ms[int(0.975*B)-1]
pairs = [(0,1),(2,3),(4,5),(0,2),(1,3),(3,5),(2,4)]
for d in sys.argv[1:]:
    c = json.load(open(d + '/compare.json'))
    ent = c['entries']
    t = {m['entry']: m['per_seed'] for m in c['metrics'] if m['metric'] == 'time_to_target_s'}
    b = {m['entry']: m['per_seed'] for m in c['metrics'] if m['metric'].startswith('bytes')}
    print(d, c['seeds'])
    for i, j in pairs:
        a, bb = t[ent[i]], t[ent[j]]
        xs = [x - y for x, y in zip(a, bb) if x is not None and y is not None]
        m, lo, hi = boot(xs)
        print(f"  {ent[i]:55s} - {ent[j]:55s}: {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}")
print("difference in differences: (ucb1 - fixed) without over-selection minus the same with it")
for d in sys.argv[1:]:
    c = json.load(open(d + '/compare.json')); ent = c['entries']
    t = {m['entry']: m['per_seed'] for m in c['metrics'] if m['metric'] == 'time_to_target_s'}
    u, uo, f, fo = (t[ent[k]] for k in (2, 3, 4, 5))
    xs = [(a - b) - (x - y) for a, b, x, y in zip(u, f, uo, fo) if None not in (a, b, x, y)]
    m, lo, hi = boot(xs)
    print(f"  {d}: {m:+6.1f} [{lo:+6.1f}, {hi:+6.1f}] n {len(xs)}")
