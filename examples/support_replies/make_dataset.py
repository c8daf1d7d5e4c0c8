"""Generate the instruction example: support ticket -> first reply draft, for `base.task: generation`.

Everything here is written by the domaintune project. The prompts are the clean tickets of
../support_tickets/labelled.csv (rows listed in its noise.csv are left out); each reply draft is
composed from the ticket's class (a team-specific first step), a greeting and a closing, chosen
by a seeded RNG. Deliberate defects, listed in noise.csv, let dedupe and audit be checked:
  exact_duplicate     the same ticket and reply twice
  response_conflict   the same ticket with two different replies
  near_empty_reply    a reply of one or two words
  long_reply          a reply far longer than the rest (a length outlier)

Run `python examples/support_replies/make_dataset.py` to rewrite pairs.csv and noise.csv
(byte-identical on every run: seeded, standard library only).
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

SEED = 20261201
PER_CLASS = 30
HERE = Path(__file__).resolve().parent
TICKETS = HERE.parent / "support_tickets"

GREETINGS = ["Hi there,", "Hello,", "Thanks for reaching out.", "Thanks for writing in."]
CLOSINGS = ["Best regards, the Ledgerly team", "Kind regards, Ledgerly Support", "Thanks, Ledgerly Support"]
FIRST_STEP = {
    "bug_report": ["Sorry about the error. Could you send the steps that trigger it and a screenshot? "
                   "I have opened a ticket with engineering.",
                   "That looks like a bug on our side. Please tell us your browser and the time it happened, "
                   "and we will investigate."],
    "billing_dispute": ["I am sorry about the charge. I have asked billing to review your last invoice and will "
                        "confirm any refund within two business days.",
                        "Thanks for flagging the charge. Billing will check your plan and payments and reply today."],
    "login_access": ["Let us get you back in. I have sent a password reset link; if you use SSO, please ask your "
                     "admin to check the identity provider settings.",
                     "I have unlocked your account. Please try signing in again and tell me if the code still "
                     "does not arrive."],
    "integration_api": ["Please reconnect the integration under Settings > Integrations and send us the error "
                        "message and the request id from the log.",
                        "Our integrations team is looking at the sync. Could you share the webhook endpoint and "
                        "the time of the last successful run?"],
    "feature_request": ["Thanks for the idea. I have shared it with our product team and added your vote to the "
                        "request.",
                        "That is not possible yet, but I have passed your request to product and will let you know "
                        "if it is planned."],
    "invoice_delivery": ["Please ask your client to check their spam folder, and confirm the address on the "
                         "invoice. You can also resend it from the invoice page.",
                         "I checked the delivery log. Please add our sending domain to your client's allow list "
                         "and resend the invoice."],
    "data_export": ["You can export all data as CSV under Settings > Data. For large accounts the file arrives by "
                    "email within an hour.",
                    "I have started the export for you; the download link will arrive by email shortly."],
    "account_cancellation": ["I am sorry to see you go. I have scheduled the cancellation for the end of your "
                             "billing period; your data stays available until then.",
                             "Before we cancel, would a cheaper plan help? If not, reply to confirm and we will "
                             "close the account."],
}


def _clean_tickets() -> list[dict]:
    noisy = {r["ticket_id"] for r in csv.DictReader((TICKETS / "noise.csv").open(encoding="utf-8"))}
    rows = [r for r in csv.DictReader((TICKETS / "labelled.csv").open(encoding="utf-8")) if r["ticket_id"] not in noisy]
    per: dict[str, list[dict]] = {}
    for r in rows:
        per.setdefault(r["label"], [])
        if len(per[r["label"]]) < PER_CLASS:
            per[r["label"]].append(r)
    return [r for label in sorted(per) for r in per[label]]


def _reply(rng: random.Random, label: str) -> str:
    return f"{rng.choice(GREETINGS)} {rng.choice(FIRST_STEP[label])} {rng.choice(CLOSINGS)}"


def build() -> tuple[list[list[str]], list[list[str]]]:
    rng = random.Random(SEED)
    tickets = _clean_tickets()
    rng.shuffle(tickets)
    pairs = [[t["ticket_id"], t["text"], _reply(rng, t["label"])] for t in tickets]
    noise = []
    n = len(pairs)
    for k, src in enumerate(pairs[:3]):  # exact duplicates
        pairs.append([f"DUP-{k + 1:03d}", src[1], src[2]])
        noise.append([f"DUP-{k + 1:03d}", "exact_duplicate", f"of={src[0]}"])
    for k, src in enumerate(pairs[3:5]):  # one prompt, two different replies
        other = next(r for r in FIRST_STEP if r not in src[2])
        pairs.append([f"CONF-{k + 1:03d}", src[1], f"Hello, {FIRST_STEP[other][0]} Thanks, Ledgerly Support"])
        noise.append([f"CONF-{k + 1:03d}", "response_conflict", f"of={src[0]}"])
    for k, i in enumerate(range(5, 8)):  # near-empty replies
        pairs[i][2] = ["ok", "Noted.", "Thanks!"][k]
        noise.append([pairs[i][0], "near_empty_reply", f"reply={pairs[i][2]!r}"])
    i = 8
    pairs[i][2] = " ".join([pairs[i][2]] * 6)
    noise.append([pairs[i][0], "long_reply", "the reply repeated 6 times"])
    assert len(pairs) == n + 5
    return pairs, noise


def write(out: Path) -> tuple[int, int]:
    pairs, noise = build()
    with (out / "pairs.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ticket_id", "prompt", "response"])
        w.writerows(pairs)
    with (out / "noise.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ticket_id", "kind", "detail"])
        w.writerows(noise)
    return len(pairs), len(noise)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE), help="folder to write pairs.csv and noise.csv (default: here)")
    n_pairs, n_noise = write(Path(ap.parse_args(argv).out))
    print(f"wrote {n_pairs} pairs, {n_noise} deliberate defects")


if __name__ == "__main__":
    main()
