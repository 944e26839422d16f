# Function-by-function difference per request between two builds: diff.py NEW_LARGE NEW_SMALL OLD_LARGE OLD_SMALL (callgrind files of count.sh)
import subprocess, re, sys, collections
def load(f):
    out = subprocess.run(["callgrind_annotate","--inclusive=no","--threshold=100",f],capture_output=True,text=True).stdout
    d = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(" [")[0]
            name = name.split(":",1)[1] if ":" in name else name
            d[name] += int(m.group(1).replace(",",""))
    return d
def per(big, small):
    b, s = load(big), load(small)
    return {k: (b[k]-s[k])/2000 for k in set(b)|set(s)}
new = per(sys.argv[1], sys.argv[2]); old = per(sys.argv[3], sys.argv[4])
rows = sorted(((new.get(k,0)-old.get(k,0), new.get(k,0), old.get(k,0), k) for k in set(new)|set(old)), reverse=True)
for r in rows[:25]: print("%8.0f %8.0f %8.0f %s" % r)
print("...")
for r in rows[-10:]: print("%8.0f %8.0f %8.0f %s" % r)
