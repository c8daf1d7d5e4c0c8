"""Generate the embedded example: support tickets for "Ledgerly", a fictional B2B invoicing app.

Everything here is written by the domaintune project; no external dataset is
copied. Texts are composed from many templates x slot fillers x customer tones
(polite, terse, angry, rambling), with typos, greetings and signatures, so a
frozen sentence encoder separates the classes well but not perfectly.

Deliberate noise is injected and listed in noise.csv, so the pipeline's dedupe
and audit stages can be checked against what is really there:
  exact_duplicate  a copy of another ticket, identical or differing only in
                   case / whitespace / NFKC-foldable characters (NBSP, full-width)
  near_duplicate   a copy with a word or two added or changed
  label_flip       the label was flipped to a plausible wrong class
  label_conflict   the same text as another ticket, with a different label

Run `python examples/support_tickets/make_dataset.py` to rewrite the files next
to this script; the output is byte-identical on every run (seeded, standard
library only, no set/hash ordering anywhere).
"""
from __future__ import annotations

import argparse
import csv
import io
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20261122
PRODUCT = "Ledgerly"

# Base (noise-free) rows per class: mildly imbalanced, largest/smallest = 3.0.
CLASS_COUNTS = {
    "bug_report": 228,
    "billing_dispute": 192,
    "login_access": 172,
    "integration_api": 146,
    "feature_request": 124,
    "invoice_delivery": 104,
    "data_export": 90,
    "account_cancellation": 76,
}
# Plausible wrong labels for flips and conflicts: the classes a tired agent confuses.
CONFUSABLE = {
    "billing_dispute": ["invoice_delivery", "account_cancellation", "bug_report"],
    "invoice_delivery": ["billing_dispute", "bug_report"],
    "login_access": ["bug_report", "account_cancellation"],
    "bug_report": ["login_access", "integration_api", "data_export"],
    "feature_request": ["bug_report", "integration_api", "data_export"],
    "integration_api": ["data_export", "bug_report", "feature_request"],
    "account_cancellation": ["billing_dispute", "data_export"],
    "data_export": ["integration_api", "bug_report", "feature_request"],
}
N_EXACT_DUP = 24      # ~2% of rows
N_NEAR_DUP = 24       # ~2%
N_FLIP = 48           # ~4%
N_CONFLICT = 4        # a handful
N_UNLABELLED = 3000
MIN_WORDS, MAX_WORDS = 5, 60
# Any two rows not recorded as duplicates stay below this word-3-gram Jaccard,
# and every recorded near duplicate is above NEAR_MIN, so a MinHash dedupe at
# the default threshold 0.8 has a clear gap to work in.
# NEAR_MIN leaves room for MinHash's estimate error (~0.03 at 128 permutations); a
# dedupe whose LSH banding is set at 0.8 itself still misses ~15% of pairs at 0.88
# (see tests/test_examples.py), which is the point: the example exposes it.
DISTINCT_MAX = 0.6
NEAR_MIN = 0.88

# ---------------------------------------------------------------- slot fillers
INTEGRATIONS = ["Stripe", "QuickBooks", "Xero", "Salesforce", "Zapier", "HubSpot", "NetSuite", "Shopify",
                "PayPal", "Slack", "Google Sheets", "GoCardless", "Sage", "FreshBooks", "Plaid"]
FEATURES = ["recurring invoices", "the payments dashboard", "expense tracking", "the client portal",
            "multi-currency invoicing", "tax rates", "payment reminders", "the mobile app", "time tracking",
            "purchase orders", "credit notes", "the reports page", "bank reconciliation", "estimates",
            "partial payments", "late fees", "the invoice editor", "custom invoice templates", "bulk actions",
            "the customer list", "approval workflows", "the audit log", "VAT returns", "payment links"]
PLANS = ["Starter", "Growth", "Pro", "Business", "Enterprise"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge", "Brave"]
DEVICES = ["iPhone", "Android phone", "iPad", "Windows laptop", "MacBook", "Chromebook"]
FORMATS = ["CSV", "Excel", "XLSX", "PDF", "JSON"]
REPORTS = ["profit and loss report", "aging report", "tax summary", "sales by client report", "VAT report",
           "cash flow report", "unpaid invoices report", "payments received report", "general ledger"]
FIELDS = ["due date", "tax ID", "PO number", "client address", "line item descriptions", "currency",
          "discount column", "payment terms", "notes field", "customer reference"]
ROLES = ["admin", "accountant", "bookkeeper", "finance manager", "owner", "external auditor"]
ERRORS = ["error 500", "E1042", "ERR_SYNC_409", "HTTP 502", "a 'Something went wrong' banner",
          "TypeError: cannot read properties of undefined", "error code LDG-311", "a blank white page",
          "E2207", "timeout error", "error 403", "ERR_PDF_RENDER"]
FIRST_NAMES = ["Maria", "Tom", "Priya", "Jonas", "Aisha", "Carlos", "Mei", "Olga", "Kwame", "Sophie", "Liam",
               "Fatima", "Hiro", "Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Ivan", "Julia",
               "Kofi", "Lena", "Marco", "Nadia", "Oscar", "Paula", "Raj", "Sara", "Tariq", "Uma", "Victor"]
CO_A = ["Northwind", "Bluefin", "Cedar", "Harbor", "Summit", "Redwood", "Silverline", "Oakridge", "Brightside",
        "Ironclad", "Maple", "Granite", "Lumen", "Evergreen", "Copperleaf", "Riverbend", "Stonegate", "Westfield"]
CO_B = ["Dental", "Logistics", "Plumbing", "Design", "Consulting", "Catering", "Studios", "Legal", "Roofing",
        "Analytics", "Bakery", "Clinic", "Media", "Engineering", "Landscaping", "Tutoring", "Freight", "Labs"]
CO_C = ["", "", " Ltd", " LLC", " Inc", " GmbH", " & Co"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def _amount(r: random.Random) -> str:
    cur = _CURRENCY[0] or r.choice(["$", "$", "$", "€", "£"])
    _CURRENCY[0] = cur  # one currency per text: "billed $40 but costs €30" reads as nonsense
    value = r.choice([r.randint(9, 99), r.randint(100, 999), r.randint(1000, 25000)])
    cents = r.choice(["", f".{r.randint(0, 99):02d}", ".00"])
    whole = f"{value:,}" if value >= 1000 and r.random() < 0.6 else str(value)
    return f"{cur}{whole}{cents}"


def _date(r: random.Random) -> str:
    k = r.randrange(6)
    if k == 0:
        return f"{r.choice(MONTHS)} {r.randint(1, 28)}"
    if k == 1:
        return f"{r.randint(1, 28)} {r.choice(MONTHS)}"
    if k == 2:
        return f"last {r.choice(WEEKDAYS)}"
    if k == 3:
        return r.choice(["yesterday", "this morning", "two days ago", "last week", "earlier today"])
    if k == 4:
        return f"2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    return f"the {r.choice(['1st', '2nd', '3rd', '5th', '10th', '15th', '20th', '28th'])}"


def _company(r: random.Random) -> str:
    return f"{r.choice(CO_A)} {r.choice(CO_B)}{r.choice(CO_C)}"


def _invoice(r: random.Random) -> str:
    return r.choice([f"INV-{r.randint(1000, 99999)}", f"#{r.randint(1000, 9999)}", str(r.randint(100, 9999))])


SLOTS = {
    "integration": lambda r: r.choice(INTEGRATIONS),
    "feature": lambda r: r.choice(FEATURES),
    "plan": lambda r: r.choice(PLANS),
    "browser": lambda r: r.choice(BROWSERS),
    "device": lambda r: r.choice(DEVICES),
    "format": lambda r: r.choice(FORMATS),
    "report": lambda r: r.choice(REPORTS),
    "field": lambda r: r.choice(FIELDS),
    "role": lambda r: r.choice(ROLES),
    "error": lambda r: r.choice(ERRORS),
    "name": lambda r: r.choice(FIRST_NAMES),
    "company": _company,
    "client": _company,
    "amount": _amount,
    "amount2": _amount,
    "date": _date,
    "month": lambda r: r.choice(MONTHS),
    "invoice": _invoice,
    "n": lambda r: str(r.choice([2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 40])),
    "count": lambda r: str(r.choice([3, 7, 12, 18, 25, 40, 60, 85, 120, 200, 350, 1200])),
    "years": lambda r: str(r.randint(2, 9)),
    "card": lambda r: f"{r.randint(0, 9999):04d}",
    "quarter": lambda r: r.choice(["Q1", "Q2", "Q3", "Q4"]),
    "email": lambda r: f"{r.choice(FIRST_NAMES).lower()}@{r.choice(CO_A).lower()}{r.choice(['.com', '.co.uk', '.de', '.io'])}",
    "version": lambda r: f"{r.randint(3, 5)}.{r.randint(0, 19)}.{r.randint(0, 9)}",
    "minutes": lambda r: str(r.choice([5, 10, 15, 20, 30, 45, 60, 90])),
    "status": lambda r: str(r.choice([400, 401, 403, 404, 409, 422, 429, 500, 502, 503])),
}
_SLOT_RE = re.compile(r"\{(\w+)\}")
_CURRENCY: list = [None]


def fill(template: str, r: random.Random) -> str:
    _CURRENCY[0] = None
    return _SLOT_RE.sub(lambda m: SLOTS[m.group(1)](r), template)


# ---------------------------------------------------------------- templates
# CORE: the sentence that carries the intent. Some deliberately borrow the
# vocabulary of a confusable class (marked "# ~other"), as real tickets do.
CORE = {
    "billing_dispute": [
        "We were charged twice for our {plan} subscription this month.",
        "Our card ending in {card} was billed {amount} but our plan costs {amount2}.",
        "I see a charge of {amount} from {product} on {date} that I don't recognise.",
        "We downgraded to {plan} but you still billed us at the old price.",
        "Why did our {product} bill go up to {amount} without any notice?",
        "Please refund the {amount} charge, we never approved the upgrade to {plan}.",
        "You charged us for {n} seats but only {count} people use the account.",
        "The annual renewal of {amount} went through even though we asked not to renew.",  # ~cancellation
        "I cancelled on {date} and was still charged {amount} afterwards.",  # ~cancellation
        "Our {product} receipt for {month} shows VAT added twice.",
        "The {product} invoice you sent us has the wrong amount, it says {amount} instead of {amount2}.",  # ~invoice_delivery
        "We were promised a discount on the {plan} plan but it is not applied to the bill.",
        "Got charged {amount} for a trial that was supposed to be free.",
        "There are two identical payments of {amount} on our statement from you.",
        "I want to dispute the overage fee of {amount} on our last bill.",
        "Your pricing page says {amount} per month but our card was charged {amount2}.",
        "The refund you promised on {date} has still not reached our account.",
        "We are being billed in euros although our account is set to dollars.",
        "Our bank flagged a {product} charge of {amount} as suspicious, what is it for?",
        "The proration on our upgrade to {plan} looks wrong, we paid for the full month.",
        "Can someone explain the extra {amount} line on this month's subscription invoice?",  # ~invoice_delivery
        "Our credit of {amount} was never applied to the next billing cycle.",
        "The payment failed but the money still left our bank account.",  # ~bug
        "We were charged for the {feature} add-on that we never turned on.",
    ],
    "invoice_delivery": [
        "Invoices we send to {client} never arrive in their inbox.",
        "My client says they did not receive invoice {invoice} sent on {date}.",
        "Invoice emails to {email} keep bouncing back.",
        "Our invoices are landing in customers' spam folders.",
        "The PDF attachment is missing from the invoice email our client gets.",
        "Payment reminders are not going out to overdue clients anymore.",
        "The pay now link in the invoice email takes {client} to an expired page.",  # ~bug
        "Invoice {invoice} shows as sent but {client} never got it.",
        "Can we send invoices from our own domain so they stop going to junk?",  # ~feature
        "Clients receive the invoice email but the amount shows {amount} instead of {amount2}.",  # ~billing
        "Recurring invoices did not send on {date} to any of our customers.",
        "The invoice email goes to the old contact at {client} instead of {email}.",
        "Our customers get the reminder but not the original invoice.",
        "We need to resend {count} invoices that failed to deliver last week.",
        "The invoice email arrives with our logo broken and no PDF.",
        "{client} says the invoice link asks them to log in, they are not a {product} user.",  # ~login
        "Sent invoices show a delivery failed status for every Gmail address.",
        "CC addresses on invoices are ignored, only the main contact gets it.",
        "Invoice emails are delayed by hours, clients get them the next day.",
        "Our client in Germany received the invoice in English instead of German.",
        "The invoice PDF {client} receives is blank on page two.",  # ~bug
        "Why does the delivery log say opened when the customer swears they never got invoice {invoice}?",
    ],
    "login_access": [
        "I can't log in, it says my password is incorrect even after resetting it.",
        "The password reset email never arrives.",  # ~invoice_delivery
        "I'm locked out of my {product} account after too many attempts.",
        "Two-factor codes from my authenticator app are always rejected.",
        "I got a new {device} and lost my 2FA, how do I get back in?",
        "Our SSO login with Okta stopped working on {date}.",
        "My colleague accepted the invite but cannot access the workspace.",
        "Our {role} was removed by mistake and can't get back into the account.",
        "The login page keeps redirecting me back to the login page.",  # ~bug
        "I changed my email address and now I can't sign in with either one.",
        "The owner of our account left the company, how do we regain access?",
        "I'm not receiving the verification code by SMS.",
        "Session expires every {minutes} minutes and logs me out.",
        "Google sign-in says this account does not exist.",
        "Our {role} sees a permission denied message on the {feature} page.",  # ~bug
        "How do I give our {role} access to {feature} without making them admin?",  # ~feature
        "After the password change I can log in on {browser} but not on the mobile app.",
        "My account shows as deactivated but we are still paying for it.",  # ~billing
        "Please unlock the account for {email}, they are stuck at the captcha.",
        "I signed up with the wrong email and can't log in to verify it.",
        "Magic link login says the link is invalid or expired.",
        "We enabled SSO and now nobody on the team can log in.",
    ],
    "bug_report": [
        "The save button on the invoice editor does nothing when I click it.",
        "The {report} shows totals that don't match the individual invoices.",  # ~billing
        "{feature} crashes with {error} when I open it.",
        "Since version {version} the app freezes on {device} when adding a line item.",
        "Tax is calculated on the discount instead of the net amount.",
        "Dates on the dashboard are off by one day for our timezone.",
        "When I duplicate an invoice the line items come out in a random order.",
        "The search box in {feature} returns no results even for exact invoice numbers.",
        "Uploading a receipt photo fails with {error}.",
        "The {field} disappears after I save the invoice.",
        "The page shows {error} every time I try to edit a client.",
        "On {browser} the dropdown for {field} cannot be scrolled.",
        "The mobile app crashes immediately after the splash screen on {device}.",
        "Currency symbols are wrong on invoices in multi-currency mode.",
        "The login page throws {error} after I enter my password.",  # ~login
        "Exporting the {report} to {format} produces an empty file.",  # ~data_export
        "The {integration} sync status says done but nothing was imported.",  # ~integration
        "Paid invoices still show as overdue on the dashboard.",
        "Recurring invoice schedule skips every other month.",
        "Dark mode makes the totals on {feature} unreadable.",
        "The bulk delete button removed the wrong invoices.",
        "Rounding is wrong, {amount} becomes {amount2} on the PDF.",
        "Charts on the reports page never finish loading.",
        "The app logs an {error} in the console and the form resets.",
        "Drag and drop reordering of line items does not stick.",
        "Clicking mark as paid throws {error} for partial payments.",
    ],
    "feature_request": [
        "It would be great if {feature} supported custom fields.",
        "Please add a way to schedule reports to be emailed every week.",
        "Do you plan to support {integration}? We would switch our whole team.",  # ~integration
        "Could you add a dark mode to the mobile app?",
        "We would love to set different payment terms per client.",
        "Any chance of adding approval steps before invoices go out?",
        "Please let us export the {report} as {format}, CSV only is limiting.",  # ~data_export
        "Can you add more languages for invoice templates, at least Spanish and French?",
        "Would be nice to bulk edit the {field} on many invoices at once.",
        "We need role permissions so the {role} can view but not edit.",  # ~login
        "Feature idea: automatic late fees after {n} days overdue.",
        "Please support partial refunds directly from {feature}.",
        "Is there a roadmap for a native {integration} integration?",  # ~integration
        "Could {feature} remember the last filter I used?",
        "We'd like to attach timesheets to invoices automatically.",
        "Please allow more than one tax rate per line item.",
        "Suggestion: show a preview of the email before sending an invoice.",  # ~invoice_delivery
        "It would help a lot if the dashboard showed cash flow for the next {n} weeks.",
        "Can you add keyboard shortcuts to the invoice editor?",
        "We would pay extra for a sandbox account to test changes.",
        "Please add webhooks for when an invoice is viewed.",  # ~integration
        "Would love a Zapier trigger for new estimates.",  # ~integration
    ],
    "integration_api": [
        "Our {integration} sync has been failing since {date} with {error}.",
        "Payments made through {integration} are not marked as paid in {product}.",
        "The API returns {status} when we create invoices with more than {count} line items.",
        "We hit the API rate limit at only {count} requests per minute.",
        "Webhook deliveries to our endpoint stopped on {date}.",
        "The {integration} connection keeps asking us to reauthorize every day.",
        "Invoices are duplicated in {integration} after every sync.",
        "Our API key was rotated and now every request gets {status}.",
        "The OAuth callback fails when connecting {integration}.",
        "Zapier zap for new paid invoices is not triggering anymore.",
        "Customer records from {integration} import without their tax ID.",
        "The API docs say the due_date field is optional but we get {status} without it.",
        "Is there an API endpoint to pull all payments for a date range?",  # ~data_export
        "Our nightly script that pulls invoices through the API times out.",  # ~data_export
        "Chart of accounts mapping to {integration} is wrong after the update.",
        "The webhook signature check fails for invoice.paid events.",
        "Refunds in {integration} do not appear in {product} at all.",
        "Bank feed from {integration} stopped importing transactions.",
        "We need the API to return the PDF link for each invoice.",  # ~feature
        "The {integration} app shows connected but no data flows either way.",
        "Pagination in the invoices API skips records past page {n}.",
        "Our developer gets CORS errors calling the API from the browser.",
    ],
    "account_cancellation": [
        "Please cancel our subscription at the end of this billing period.",
        "We are closing the business and need to cancel {product}.",
        "How do I delete our account and all associated data?",  # ~data_export
        "We want to downgrade from {plan} to the free plan.",  # ~billing
        "Please don't renew our plan, we are moving to another tool.",
        "I'd like to close my account, the cancel button does not work.",  # ~bug
        "We're switching to {integration} for invoicing, please cancel us.",
        "Can you confirm our account is cancelled and no further charges will happen?",  # ~billing
        "Cancel the {plan} plan for {company} effective immediately.",
        "We only need {product} until {month}, how do we end the contract?",
        "Please remove our card and close the workspace.",
        "What happens to our invoices if we cancel?",  # ~data_export
        "Our trial ends on {date} and we don't want to continue.",
        "We merged with another company and need to shut down this workspace.",
        "Please terminate the account for {email}, we no longer work together.",
        "I want to pause our subscription for the summer instead of cancelling.",
        "How much notice do you need to cancel an annual contract?",
        "We are unhappy with the price increase and will cancel unless it is reverted.",  # ~billing
    ],
    "data_export": [
        "How can I export all our invoices for {year_phrase}?",
        "Our accountant needs every invoice as {format} for the audit.",
        "The export of the {report} is missing the {field} column.",
        "I need a full backup of our client list before the year end.",
        "Downloading all invoice PDFs at once only gives me {count} of them.",
        "The {format} export uses commas as decimal separators and breaks our spreadsheet.",  # ~bug
        "Can I export expenses with the receipt images included?",
        "We need our data exported before we leave {product}.",  # ~cancellation
        "The export has been processing for {minutes} minutes and never finishes.",  # ~bug
        "Where do I find the export for payments received in {quarter}?",
        "Is there a way to export time tracking entries per project?",
        "Exported {format} files have garbled characters in client names.",  # ~bug
        "Please send me a copy of all our data under GDPR.",  # ~cancellation
        "I need the general ledger export in a format {integration} can import.",  # ~integration
        "The download link for our export expired before I could use it.",
        "Can the export include archived clients too?",
        "We need a monthly export of all transactions for our auditors.",
        "The scheduled export to our email stopped arriving.",  # ~invoice_delivery
    ],
}

DETAIL = {
    "billing_dispute": [
        "Our card ending in {card} was charged on {date}.",
        "The charge is {amount} and we expected {amount2}.",
        "Please issue a refund or a credit note.",
        "Our finance team needs this sorted before the {quarter} close.",
        "We have been on the {plan} plan for {years} years and never had this.",
        "I attached the bank statement showing both payments.",
        "Nobody on our side approved this charge.",
    ],
    "invoice_delivery": [
        "The client's address is {email}, we checked it twice.",
        "It worked fine until {date}.",
        "This is delaying payments from our customers.",
        "About {count} invoices are affected.",
        "The delivery log shows nothing for these invoices.",
        "Our client is now late paying because of this.",
    ],
    "login_access": [
        "My username is {email}.",
        "I tried on {browser} and on my {device}.",
        "I already cleared cookies and tried incognito.",
        "I need to get in today to send invoices.",
        "Our {role} has the same problem.",
        "The reset link says it has expired.",
    ],
    "bug_report": [
        "Steps: open {feature}, click edit, change the {field}, save.",
        "This happens on {browser} and on the {device}.",
        "I'm on version {version}.",
        "Screenshot attached, the console shows {error}.",
        "It started after the last update.",
        "It happens every time, I can reproduce it.",
        "Refreshing the page does not help.",
    ],
    "feature_request": [
        "Our competitors already have this.",
        "It would save our team hours every month.",
        "Happy to beta test it.",
        "Is this on the roadmap?",
        "Right now we do it by hand in a spreadsheet.",
        "Several of our {role}s asked for this.",
    ],
    "integration_api": [
        "Our developer says the request body matches the docs.",
        "The last successful sync was {date}.",
        "We use the {integration} connector on the {plan} plan.",
        "Request id from the response headers is attached.",
        "Disconnecting and reconnecting did not fix it.",
        "This breaks our month-end reconciliation.",
    ],
    "account_cancellation": [
        "Our account is under {company}.",
        "Please confirm by email once it's done.",
        "We have {n} users on the {plan} plan.",
        "Thanks for the service over the past {years} years.",
        "We would like this done before {date}.",
        "The decision has been made by management.",
    ],
    "data_export": [
        "Our auditors need it by {date}.",
        "We have about {count} invoices in total.",
        "A {format} file would be ideal.",
        "I looked in Settings but could not find it.",
        "We need the data for our tax filing.",
        "It's for {company}, our second workspace.",
    ],
}

# Sentences any ticket may carry: they dilute the intent signal, as in real mail.
CONTEXT = [
    "We have been using {product} for {years} years.",
    "Our team of {n} uses the {plan} plan.",
    "I'm the {role} at {company}.",
    "This is urgent for us.",
    "We are a small business and rely on {product} every day.",
    "I'm writing on behalf of {company}.",
    "Our month-end close is coming up.",
    "I already checked the help center.",
    "We use {product} together with {integration}.",
    "This started {date}.",
    "I'm on {browser}.",
    "Not sure who else to ask.",
    "Our accountant pointed this out.",
    "I spoke to someone on chat but the issue is still open.",
    "We onboarded {n} new colleagues last month.",
    "Let me know if you need more details.",
]
GREETINGS = ["Hi", "Hello", "Hey", "Hi there", "Hello team", "Good morning", "Dear {product} support",
             "Hi {product} team", "Hey folks", "Hi support"]
CLOSINGS = ["Thanks", "Thank you", "Cheers", "Regards", "Best", "Thanks in advance", "Kind regards",
            "Many thanks", "Best regards"]
ANGRY = ["This is unacceptable.", "This is the third time I'm writing about this.", "Fix this now.",
         "I'm seriously considering switching providers.", "Why is nobody answering?", "Very frustrating.",
         "We pay for this service and it does not work!", "Please escalate this immediately."]
POLITE = ["Could you please take a look?", "I'd appreciate your help with this.", "Sorry to bother you.",
          "Any help would be appreciated.", "Thanks for looking into it.", "Hope you're having a good day."]
RAMBLE = ["I'm not very technical so bear with me.", "Long story short, we have a problem.",
          "I tried a few things myself first.", "My colleague thought it might be on our side but I doubt it.",
          "Anyway, here is what happened.", "I know you're busy, so I'll try to explain.",
          "To give you some background, we switched to {product} last year."]
YEAR_PHRASES = ["last year", "2025", "the last tax year", "the previous quarter", "all time", "{quarter}"]
SLOTS["product"] = lambda r: PRODUCT
SLOTS["year_phrase"] = lambda r: fill(r.choice(YEAR_PHRASES), r)

# Difficulty knobs, tuned with check_difficulty.py so frozen MiniLM + logistic
# regression scores ~90% (see README.md): the share of tickets with a side
# remark from a confusable class, and how often that remark is a full second ask.
MIX_P = 0.5
ALSO_P = 0.5
TONES = ["neutral", "polite", "terse", "angry", "rambling"]
TONE_WEIGHTS = [30, 25, 20, 12, 13]


def _typo(word: str, r: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = r.randrange(1, len(word) - 1)
    k = r.randrange(3)
    if k == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]   # swap
    if k == 1:
        return word[:i] + word[i + 1:]                            # drop
    return word[:i] + word[i] + word[i:]                          # double


def add_typos(text: str, r: random.Random, n: int) -> str:
    words = text.split(" ")
    for _ in range(n):
        j = r.randrange(len(words))
        words[j] = _typo(words[j], r)
    return " ".join(words)


def compose_ticket(label: str, r: random.Random) -> tuple[str, int, str]:
    """One ticket text for `label`; returns (text, core template index, filled core sentence)."""
    t = r.choices(range(len(CORE[label])), k=1)[0]
    core = fill(CORE[label][t], r)
    tone = r.choices(TONES, TONE_WEIGHTS)[0]
    parts: list[str] = []
    if tone == "terse":
        s = core.rstrip(".")
        s = s[0].lower() + s[1:] if r.random() < 0.7 else s
        parts = [s]
        if r.random() < 0.3:
            parts.append(fill(r.choice(DETAIL[label]), r).rstrip(".").lower())
        text = " - ".join(parts) if len(parts) > 1 else parts[0]
        if r.random() < 0.3:
            text += r.choice([" pls", " asap", "?", " thx", "!!"])
        return text, t, core
    if tone in ("polite", "rambling") or r.random() < 0.25:
        g = fill(r.choice(GREETINGS), r)
        parts.append(g + r.choice([",", ",", "!", ""]))
    if tone == "rambling":
        parts.append(fill(r.choice(RAMBLE), r))
        parts.append(fill(r.choice(CONTEXT), r))
    elif r.random() < 0.3:
        parts.append(fill(r.choice(CONTEXT), r))
    parts.append(core)
    if r.random() < 0.55:
        parts.append(fill(r.choice(DETAIL[label]), r))
    if r.random() < MIX_P:
        # A side remark from a confusable class: real tickets mix topics, and the
        # label is the main ask. This is what keeps a frozen encoder below 100%.
        other = r.choice(CONFUSABLE[label])
        if r.random() < ALSO_P:
            side = fill(r.choice(CORE[other]), r)
            parts.append(r.choice(["Also, ", "Unrelated, but ", "On top of that, ", "Side note: "]) + side[0].lower() + side[1:])
        else:
            parts.append(fill(r.choice(DETAIL[other]), r))
    if tone == "rambling":
        parts.append(fill(r.choice(CONTEXT), r))
    if tone == "angry":
        parts.append(r.choice(ANGRY))
        if r.random() < 0.3:
            parts[-2] = parts[-2].upper() if len(parts[-2]) < 80 else parts[-2]
    if tone == "polite":
        parts.append(r.choice(POLITE))
    if tone in ("polite", "rambling") or r.random() < 0.2:
        name = r.choice(FIRST_NAMES)
        sig = r.choice([f"{r.choice(CLOSINGS)}, {name}", f"{r.choice(CLOSINGS)}", f"- {name}",
                        f"{r.choice(CLOSINGS)}, {name} ({_company(r)})"])
        parts.append(sig)
    text = " ".join(parts)
    if tone == "angry":
        text = text.replace(".", "!", 1) if r.random() < 0.4 else text
    return text, t, core


# ---------------------------------------------------------------- similarity helpers
def normalise(text: str) -> str:
    """Same normalisation the dedupe stage applies: NFKC, case-fold, collapse whitespace."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, k: int = 3) -> frozenset:
    w = normalise(text).split()
    if len(w) < k:
        return frozenset([" ".join(w)])
    return frozenset(" ".join(w[i:i + k]) for i in range(len(w) - k + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class ShingleIndex:
    """Inverted index over word 3-grams, to find each text's most similar earlier text quickly."""

    def __init__(self) -> None:
        self.sets: list[frozenset] = []
        self.post: dict[str, list[int]] = {}

    def max_similarity(self, s: frozenset) -> float:
        counts: dict[int, int] = {}
        for g in sorted(s):
            for j in self.post.get(g, ()):
                counts[j] = counts.get(j, 0) + 1
        best = 0.0
        for j, inter in counts.items():
            best = max(best, inter / (len(s) + len(self.sets[j]) - inter))
        return best

    def add(self, s: frozenset) -> None:
        j = len(self.sets)
        self.sets.append(s)
        for g in sorted(s):
            self.post.setdefault(g, []).append(j)


def n_words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- noise
FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"}


def exact_variant(text: str, kind: str, r: random.Random) -> str:
    """A copy that dedupe's normalisation (NFKC, case-fold, whitespace) maps back onto `text`."""
    if kind == "identical":
        return text
    if kind == "case":
        low = text.lower()
        return low if low != text and r.random() < 0.5 else text.upper()
    if kind == "whitespace":
        words = text.split(" ")
        j = r.randrange(len(words))
        words[j] = words[j] + "  "
        return " ".join(words) + " "
    if kind == "nbsp":
        words = text.split(" ")
        j = r.randrange(1, len(words))
        return " ".join(words[:j]) + "\u00a0" + " ".join(words[j:])
    if kind == "fullwidth":
        words = text.split(" ")
        cand = [i for i, w in enumerate(words) if w.isalnum()]
        j = r.choice(cand)
        words[j] = "".join(FULLWIDTH.get(c, c) for c in words[j])
        return " ".join(words)
    raise ValueError(kind)


NEAR_EDITS = ["append", "prepend", "replace_last", "replace_inner"]
APPEND_WORDS = ["please", "thanks", "asap", "urgently", "again", "today", "help"]
SIGN_OFF_WORDS = APPEND_WORDS + ["pls", "thx", "thanks", "regards", "best", "cheers", "advance"]
PREPEND_WORDS = ["Hi,", "Hello,", "Hey,", "Urgent:", "Re:", "Fwd:", "Again:"]


def near_variant(text: str, edit: str, r: random.Random) -> tuple[str, str]:
    words = text.split(" ")
    if edit == "append":
        w = r.choice(APPEND_WORDS)
        return text + " " + w, f"appended {w!r}"
    if edit == "prepend":
        w = r.choice(PREPEND_WORDS)
        return w + " " + text, f"prepended {w!r}"
    if edit == "replace_last" and words[-1].rstrip(".!?").lower() in SIGN_OFF_WORDS:
        w = r.choice([x for x in APPEND_WORDS if x != words[-1].rstrip(".!?").lower()])
        old = words[-1]
        return " ".join(words[:-1] + [w]), f"replaced {old!r} with {w!r}"
    if edit == "replace_last":   # no sign-off word to swap: add one instead
        w = r.choice(APPEND_WORDS)
        return text + " " + w, f"appended {w!r}"
    # a typo in one plain word inside the text (a re-sent, retyped ticket)
    inner = [j for j in range(1, len(words) - 1) if words[j].isalpha() and len(words[j]) >= 4]
    if not inner:
        return text, "no plain word to change"   # the caller rejects an unchanged text
    j = r.choice(inner)
    old = words[j]
    new = _typo(old, r)
    words[j] = new
    return " ".join(words), f"changed {old!r} to {new!r}"


# ---------------------------------------------------------------- dataset
@dataclass
class Row:
    text: str
    label: str           # the label written to labelled.csv (after any flip)
    true_label: str      # the class of the template that produced the text
    template: int        # index into CORE[true_label]; -1 for rows copied from another row
    core: str = ""       # the filled core sentence (before tone changes and typos)
    typos: int = 0       # typos added after composing
    ticket_id: str = ""
    noise: list = field(default_factory=list)  # (kind, detail) pairs; "{src}" is filled with the source id


@dataclass
class Dataset:
    rows: list           # in labelled.csv order
    noise: list          # (ticket_id, kind, detail), sorted
    unlabelled: list     # texts


def _make_base(r: random.Random) -> tuple[list[Row], ShingleIndex, list[str]]:
    """Distinct base tickets: no two share a normalised text or a word-3-gram Jaccard >= DISTINCT_MAX."""
    index = ShingleIndex()
    seen: dict[str, int] = {}
    rows: list[Row] = []
    # Interleave classes so that rejection pressure (similarity to earlier texts) is spread evenly.
    plan = [lab for lab, n in CLASS_COUNTS.items() for _ in range(n)]
    r.shuffle(plan)
    for lab in plan:
        for _attempt in range(200):
            text, t, core = compose_ticket(lab, r)
            if not MIN_WORDS <= n_words(text) <= MAX_WORDS:
                continue
            typos = 0
            if r.random() < 0.15:
                typos = r.choice([1, 1, 2])
                text = add_typos(text, r, typos)
            key = normalise(text)
            if key in seen:
                continue
            s = shingles(text)
            if index.max_similarity(s) >= DISTINCT_MAX:
                continue
            break
        else:
            raise RuntimeError(f"could not compose a distinct {lab} ticket; add templates")
        seen[key] = len(rows)
        index.add(s)
        rows.append(Row(text=text, label=lab, true_label=lab, template=t, core=core, typos=typos))
    return rows, index, list(seen)


def generate(seed: int = SEED) -> Dataset:
    r = random.Random(seed)
    base, index, keys = _make_base(r)
    n = len(base)
    order = list(range(n))
    r.shuffle(order)
    # Disjoint roles for base rows, so each noise kind is checkable on its own.
    flip_ids = order[:N_FLIP]
    exact_src = order[N_FLIP:N_FLIP + N_EXACT_DUP]
    near_pool = order[N_FLIP + N_EXACT_DUP:]
    extra: list[tuple[Row, int]] = []  # (new row, index of source base row)

    for i in flip_ids:
        row = base[i]
        row.label = r.choice(CONFUSABLE[row.true_label])
        row.noise.append(("label_flip", f"true={row.true_label};given={row.label}"))

    kinds = ["identical", "case", "whitespace", "nbsp", "fullwidth"]
    for k, i in enumerate(exact_src):
        kind = kinds[k % len(kinds)]
        src = base[i]
        dup = Row(text=exact_variant(src.text, kind, r), label=src.true_label, true_label=src.true_label,
                  template=-1)
        dup.noise.append(("exact_duplicate", "of={src};variant=" + kind))
        extra.append((dup, i))

    # Near duplicates: sources long enough that a one-word edit keeps Jaccard >= NEAR_MIN.
    made = 0
    used: list[int] = []
    for i in near_pool:
        if made == N_NEAR_DUP:
            break
        src = base[i]
        edit = NEAR_EDITS[made % len(NEAR_EDITS)]
        new, what = near_variant(src.text, edit, r)
        j = jaccard(shingles(src.text), shingles(new))
        if j < NEAR_MIN or normalise(new) == normalise(src.text) or n_words(new) > MAX_WORDS:
            continue
        dup = Row(text=new, label=src.true_label, true_label=src.true_label, template=-1)
        dup.noise.append(("near_duplicate", f"of={{src}};jaccard={j:.3f};edit={what}"))
        extra.append((dup, i))
        used.append(i)
        made += 1
    if made < N_NEAR_DUP:
        raise RuntimeError("not enough long tickets for near duplicates")

    # Conflicts: the exact text of another ticket, labelled with a plausible other class.
    rest = [i for i in near_pool if i not in used]
    conflict_src = rest[:N_CONFLICT]
    for i in conflict_src:
        src = base[i]
        wrong = r.choice(CONFUSABLE[src.true_label])
        dup = Row(text=src.text, label=wrong, true_label=src.true_label, template=-1)
        dup.noise.append(("label_conflict", f"of={{src}};labels={src.true_label}|{wrong}"))
        extra.append((dup, i))

    rows = base + [d for d, _ in extra]
    src_of = {id(d): base[i] for d, i in extra}
    perm = list(range(len(rows)))
    r.shuffle(perm)
    rows = [rows[p] for p in perm]
    for k, row in enumerate(rows, start=1):
        row.ticket_id = f"TCK-{k:06d}"
    noise = []
    for row in rows:
        for kind, detail in row.noise:
            if "{src}" in detail:
                detail = detail.replace("{src}", src_of[id(row)].ticket_id)
            noise.append((row.ticket_id, kind, detail))
    noise.sort()

    unlabelled = _make_unlabelled(r, set_keys=keys)
    return Dataset(rows=rows, noise=noise, unlabelled=unlabelled)


# ---------------------------------------------------------------- unlabelled corpus
HELP = [
    "To connect {integration}, open Settings, then Integrations, and click Connect.",
    "You can change the {field} on any draft invoice before it is sent.",
    "Recurring invoices are created at 06:00 in your workspace timezone.",
    "Admins can invite a {role} from Settings, then Team.",
    "If a client did not receive an invoice, check the delivery log on the invoice page.",
    "Two-factor authentication can be reset by a workspace owner.",
    "Exports are emailed to you as a download link that is valid for {n} days.",
    "The {report} can be filtered by client, date range and currency.",
    "Payment reminders are sent {n} days before and after the due date by default.",
    "{product} supports {format} exports for invoices, expenses and payments.",
    "Each API key is scoped to one workspace and can be revoked at any time.",
    "The API allows {count} requests per minute per key on the {plan} plan.",
    "Webhooks are retried with exponential backoff for up to {n} hours.",
    "Cancelling a subscription keeps your data available in read-only mode for {n} days.",
    "Refunds take {n} to {count} business days to appear on your statement.",
    "You can add your own sending domain so invoice emails are less likely to land in spam.",
    "Multi-currency invoicing converts amounts at the daily rate from our payment provider.",
    "Credit notes can be applied to any open invoice of the same client.",
    "The client portal lets customers download past invoices and pay online.",
    "To downgrade, go to Billing and choose the {plan} plan; changes apply at the next renewal.",
    "Bank reconciliation matches payments from {integration} to open invoices automatically.",
    "Time tracking entries can be added to an invoice as line items.",
    "Single sign-on is available on the {plan} plan with Okta, Azure AD and Google Workspace.",
    "Archived clients are hidden from lists but included in reports.",
    "Late fees can be a fixed amount or a percentage of the invoice total.",
    "The audit log records who changed what and when for {n} months.",
]
REPLIES = [
    "Thanks for reaching out, {name}. I've refunded {amount} to your card ending in {card}.",
    "Hi {name}, I've reset the two-factor authentication on your account; you can log in again now.",
    "Thanks for the report. Our engineers reproduced the issue with {feature} and a fix ships in {version}.",
    "I checked the delivery log and invoice {invoice} was rejected by the recipient's mail server.",
    "I've cancelled your subscription; you will not be charged again after {date}.",
    "Your export of the {report} is ready and the link was sent to {email}.",
    "The {integration} sync failed because the authorization expired; please reconnect it under Integrations.",
    "Thanks for the suggestion! I've passed it to our product team for the {feature} roadmap.",
    "I've unlocked the account for {email}; please ask them to reset the password.",
    "Sorry for the double charge, {name}. The duplicate payment of {amount} has been reversed.",
    "Could you send us the request id from the API response so we can trace the {status} error?",
    "I've resent invoice {invoice} to {email} and confirmed it was delivered.",
    "We've raised your API rate limit to {count} requests per minute.",
    "Your data will remain available for export for {n} days after cancellation.",
    "Thanks {name}, I've applied the {plan} discount and the next invoice will show {amount}.",
    "Our team is aware of {error} on {feature} and is working on a fix.",
    "Please clear your browser cache on {browser} and try the login again.",
    "I've added a credit of {amount} to your account for the inconvenience.",
]
RELEASE = [
    "Fixed: {feature} no longer shows {error} when opened on {browser}.",
    "New: export the {report} as {format}.",
    "Improved: {integration} sync is now up to {n} times faster.",
    "Fixed: payment reminders were not sent for invoices with a custom {field}.",
    "New: approval workflows for invoices above {amount}.",
    "Fixed: the mobile app crashed on {device} when adding a line item.",
    "Improved: invoice emails now use your sending domain when configured.",
    "New: webhooks for invoice.viewed and payment.refunded events.",
    "Fixed: rounding of tax amounts in multi-currency mode.",
    "Changed: password reset links now expire after {minutes} minutes.",
    "New: SSO with Okta and Azure AD on the {plan} plan.",
    "Fixed: the {report} total did not match the invoice list when filtered by {field}.",
    "Version {version}: faster search in {feature} and bug fixes.",
    "Deprecated: the v1 invoices endpoint will be removed in {month}.",
]


def _make_unlabelled(r: random.Random, set_keys: list[str]) -> list[str]:
    taken = dict.fromkeys(set_keys)   # normalised labelled texts: never repeated verbatim here
    out: list[str] = []
    labels = list(CLASS_COUNTS)
    weights = [CLASS_COUNTS[k] for k in labels]
    # Mix: ~45% tickets, ~25% agent replies, ~20% help-center sentences, ~10% release notes.
    kinds = ["ticket", "reply", "help", "release"]
    kind_w = [45, 25, 20, 10]
    attempts = 0
    while len(out) < N_UNLABELLED:
        attempts += 1
        if attempts > 50 * N_UNLABELLED:
            raise RuntimeError("unlabelled corpus: too many collisions; add templates")
        kind = r.choices(kinds, kind_w)[0]
        if kind == "ticket":
            text, _, _ = compose_ticket(r.choices(labels, weights)[0], r)
            if r.random() < 0.15:
                text = add_typos(text, r, 1)
        elif kind == "reply":
            text = fill(r.choice(REPLIES), r)
            if r.random() < 0.5:
                text += " " + r.choice(["Let us know if there's anything else.", "Have a great day!",
                                        f"Best, {r.choice(FIRST_NAMES)} from {PRODUCT} Support",
                                        "Happy to help further if needed."])
        elif kind == "help":
            text = fill(r.choice(HELP), r)
            if r.random() < 0.4:
                text += " " + fill(r.choice(HELP), r)
        else:
            text = fill(r.choice(RELEASE), r)
        key = normalise(text)
        if key in taken or "\n" in text:
            continue
        taken[key] = None
        out.append(text)
    return out


# ---------------------------------------------------------------- writing
FILES = ("labelled.csv", "noise.csv", "unlabelled.txt")


def render(ds: Dataset) -> dict[str, bytes]:
    """File name -> exact bytes (UTF-8, LF line ends), so re-runs are byte-identical."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ticket_id", "text", "label"])
    for row in ds.rows:
        w.writerow([row.ticket_id, row.text, row.label])
    labelled = buf.getvalue().encode("utf-8")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ticket_id", "kind", "detail"])
    w.writerows(ds.noise)
    noise = buf.getvalue().encode("utf-8")
    unl = ("\n".join(ds.unlabelled) + "\n").encode("utf-8")
    return {"labelled.csv": labelled, "noise.csv": noise, "unlabelled.txt": unl}


def write(out_dir: str | Path, seed: int = SEED) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in render(generate(seed)).items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)   # never leave a half-written file behind
        paths[name] = out / name
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent),
                   help="folder to write labelled.csv, noise.csv, unlabelled.txt (default: next to this script)")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    paths = write(args.out, args.seed)
    for _name, path in paths.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
