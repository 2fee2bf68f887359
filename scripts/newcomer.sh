#!/usr/bin/env bash
# A new user's first hour, replayed: the README's commands on a clean virtual environment, then
# the mistakes newcomers make, each checked for its exit code and message.
#
#   bash scripts/newcomer.sh              # a fresh venv in a temporary folder (a few minutes)
#   FACEPRIV_VENV=.venv bash scripts/newcomer.sh   # reuse an installed one
#
# Runs offline (FACEPRIV_OFFLINE=1): nothing may need a download. Exits 1 on the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export FACEPRIV_VENV=${FACEPRIV_VENV:-$WORK/venv}
export FACEPRIV_OFFLINE=1
FAILED=0

check() {  # check NAME EXPECTED_EXIT PATTERN -- COMMAND...
    local name=$1 want=$2 pattern=$3
    shift 4
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" != "$want" ] || ! grep -qiE -- "$pattern" <<<"$out"; then
        echo "FAIL  $name (exit $rc, wanted $want; looked for /$pattern/)"
        echo "$out" | tail -15 | sed 's/^/      /'
        FAILED=1
    else
        echo "ok    $name"
    fi
}

echo "[newcomer] install into $FACEPRIV_VENV"
if [ ! -x "$FACEPRIV_VENV/bin/facepriv" ]; then
    bash scripts/install.sh > "$WORK/install.log" 2>&1 || { tail -20 "$WORK/install.log"; exit 1; }
fi
FP="$FACEPRIV_VENV/bin/facepriv"
mkdir -p "$WORK/photos"
cp assets/examples/obama.jpg "$WORK/photos/"

# README, first command: protect with no flags on a CPU without network
check "protect with no flags: transfer, a verdict per face" 0 "held-out|no longer match" -- \
    "$FP" protect "$WORK/photos" --out "$WORK/out"
check "protect says which method and why" 0 "no CUDA device" -- \
    "$FP" protect "$WORK/photos" --out "$WORK/out2" --transfer-steps 2 --start-psnr 32
test -s "$WORK/out/obama.jpg" && echo "ok    protected photo written" || { echo "FAIL  no output"; FAILED=1; }
grep -q '"held_out"' "$WORK/out/manifest.jsonl" && echo "ok    manifest has the held-out verdict" \
    || { echo "FAIL  manifest without held_out"; FAILED=1; }
grep -q '"passed": {[^}]*false\|"passed": {[^}]*true' "$WORK/out/manifest.jsonl" \
    && echo "ok    manifest verdicts are true/false/null" || { echo "FAIL  manifest verdicts"; FAILED=1; }

# the mistakes
check "--epsilon 8/0 is a usage error" 2 "epsilon" -- "$FP" protect "$WORK/photos" --epsilon 8/0 --out "$WORK/x"
check "--epsilon 1.5 is out of range" 2 "64/255" -- "$FP" deid "$WORK/photos" --method adversarial --epsilon 1.5 --out "$WORK/x"
check "--epsilon 256 is out of range" 2 "64/255" -- "$FP" protect "$WORK/photos" --epsilon 256 --out "$WORK/x"
check "--out equal to the input with another format is refused" 2 "input" -- \
    "$FP" deid "$WORK/photos" --out "$WORK/photos" --format png
printf 'GIF89a' > "$WORK/photos/anim.gif"
check "a GIF in a folder is reported as skipped" 0 "skipp" -- "$FP" deid "$WORK/photos" --method blur --out "$WORK/gif"
rm -f "$WORK/photos/anim.gif"
mkdir -p "$WORK/lfw/Ann_A" "$WORK/lfw/Bob_B"
cp assets/examples/obama.jpg "$WORK/lfw/Ann_A/Ann_A_0001.jpg"
cp assets/examples/obama.jpg "$WORK/lfw/Ann_A/Ann_A_0002.jpg"
cp assets/examples/group.jpg "$WORK/lfw/Bob_B/Bob_B_0001.jpg"
printf '1\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\n' > "$WORK/pairs.txt"
check "audit calibrate reads LFW's pairs.txt" 0 "sface" -- \
    "$FP" audit calibrate --pairs "$WORK/pairs.txt" --root "$WORK/lfw" --models sface --no-store
check "audit -o is --out" 0 "verdict|protection|holds|PSR" -- \
    "$FP" audit --protected "$WORK/out" --original "$WORK/photos" --models sface -o "$WORK/report"
check "a missing score network names the offline method" 2 "--method transfer" -- \
    "$FP" protect "$WORK/photos" --method map --out "$WORK/map"
QUIET=$("$FP" -q deid "$WORK/photos" --method blur --out "$WORK/quiet" 2>&1)
[ -z "$QUIET" ] && echo "ok    -q prints nothing on success" || { echo "FAIL  -q printed: $QUIET"; FAILED=1; }

if [ "$FAILED" = 0 ]; then echo "[newcomer] all checks passed"; else echo "[newcomer] some checks failed"; fi
exit "$FAILED"
