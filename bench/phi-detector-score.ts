/**
 * Scores the sandbox PHI detector (src/phi/phi-detector.ts; docs/phi-boundary.md).
 *
 *   npm run -s bench:phi-detector [-- --seed N] [--json]
 *
 * 1. False positives: every resource of every bundle in ../shared/data/synthea-r4 (synthetic people:
 *    SSNs 999-xx-xxxx, phones 555-xxx-xxxx) must pass; the rate is resources with any finding.
 * 2. Catch rate on a realistic set built here (deterministic from --seed): Synthea resources, each
 *    with ONE real-looking value injected where real records carry one (Patient.identifier SSN or
 *    MBI, Patient and contact telecom, narrative, notes, a text attachment). A case is caught when
 *    the detector reports that kind at that element's path. The values are generated, never copied:
 *    SSNs SSA could issue, assigned area codes with random exchanges, addresses at everyday domains.
 *    The same injections with fictional values (SSN 9xx, 555-01xx, example.com) are controls that
 *    must pass, and a "hard" set shows formats the rules leave alone by design (reported apart).
 * 3. Cost: the detector's time per resource over all Synthea resources (it runs once per sandbox write).
 *
 * Reads the data where it is (it is never copied into the repo); prints a table, or JSON with --json.
 */
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import {
  detectRealLookingPhi,
  isDiallableNanp,
  US_MBI_SYSTEM,
  US_SSN_SYSTEM,
  type PhiKind,
} from '../src/phi/phi-detector.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { values: flags } = parseArgs({
  options: {
    seed: { type: 'string', default: '7' },
    json: { type: 'boolean', default: false },
    synthea: { type: 'string', default: path.join(repoRoot, '..', 'shared', 'data', 'synthea-r4') },
  },
});

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- Synthea JSON, read loosely
type Json = Record<string, any>;

/** mulberry32: a small seeded PRNG, so the set is the same from run to run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const rnd = prng(Number(flags.seed));
const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
const pad = (n: number, w: number) => String(n).padStart(w, '0');

// ---- generators of real-looking values --------------------------------------------------------

/** Geographic area codes in service (a sample across the US and Canada). */
const AREA_CODES = [
  201, 202, 203, 205, 206, 207, 208, 212, 213, 214, 215, 216, 217, 225, 239, 240, 248, 251, 253, 267, 281,
  301, 303, 305, 310, 312, 313, 314, 323, 339, 347, 351, 404, 407, 408, 410, 412, 413, 415, 416, 425, 443,
  469, 480, 503, 504, 508, 512, 514, 516, 520, 602, 604, 612, 614, 617, 619, 646, 650, 702, 703, 704, 713,
  718, 720, 774, 781, 786, 801, 804, 808, 813, 816, 832, 857, 858, 860, 904, 916, 917, 919, 925, 941, 949,
  954, 972, 978,
];
const MAIL_DOMAINS = [
  'gmail.com',
  'yahoo.com',
  'outlook.com',
  'hotmail.com',
  'icloud.com',
  'aol.com',
  'comcast.net',
  'verizon.net',
  'protonmail.com',
  'bostonhealth.org',
];
const FIRST = ['jane', 'john', 'maria', 'wei', 'ahmed', 'olga', 'luis', 'kim', 'sam', 'priya', 'noah', 'ava'];
const LAST = ['roe', 'doe', 'garcia', 'nguyen', 'smith', 'khan', 'ivanova', 'silva', 'lee', 'patel', 'brown'];

function realSsn(): string {
  let area = int(1, 899);
  if (area === 666) area = 665;
  return `${pad(area, 3)}-${pad(int(1, 99), 2)}-${pad(int(1, 9999), 4)}`;
}
function realPhoneParts(): [string, string, string] {
  let nxx = int(200, 999);
  while (nxx === 555 || nxx % 100 === 11) nxx = int(200, 999);
  return [String(pick(AREA_CODES)), String(nxx), pad(int(0, 9999), 4)];
}
function formatPhone([a, b, c]: [string, string, string], style = int(0, 5)): string {
  return [
    `${a}-${b}-${c}`,
    `(${a}) ${b}-${c}`,
    `${a}${b}${c}`,
    `+1 ${a} ${b} ${c}`,
    `${a}.${b}.${c}`,
    `1-${a}-${b}-${c}`,
  ][style]!;
}
/** Structured telecom values may be written any way; free text uses the separated styles. */
const realPhone = () => formatPhone(realPhoneParts());
const realPhoneText = () => formatPhone(realPhoneParts(), pick([0, 1, 3, 4, 5]));
function realEmail(): string {
  const sep = pick(['.', '_', '', '']);
  return `${pick(FIRST)}${sep}${pick(LAST)}${rnd() < 0.5 ? int(1, 99) : ''}@${pick(MAIL_DOMAINS)}`;
}
const MBI_ALPHA = 'ACDEFGHJKMNPQRTUVWXY';
function realMbi(): string {
  const a = () => MBI_ALPHA[int(0, MBI_ALPHA.length - 1)]!;
  const an = () => (rnd() < 0.5 ? a() : String(int(0, 9)));
  const n = () => String(int(0, 9));
  return `${int(1, 9)}${a()}${an()}${n()}${a()}${an()}${n()}${a()}${a()}${n()}${n()}`;
}
function realCard(): string {
  const prefix = pick(['4', '51', '52', '53', '54', '55', '37', '6011']);
  const len = prefix === '37' ? 15 : 16;
  let body = prefix;
  while (body.length < len - 1) body += String(int(0, 9));
  for (let check = 0; check < 10; check++) {
    const digits = body + check;
    let sum = 0;
    for (let i = 0; i < digits.length; i++) {
      let d = Number(digits[digits.length - 1 - i]);
      if (i % 2 === 1) d = d * 2 > 9 ? d * 2 - 9 : d * 2;
      sum += d;
    }
    if (sum % 10 === 0) return len === 16 ? digits.replace(/(\d{4})(?=\d)/g, '$1 ') : digits;
  }
  throw new Error('unreachable');
}
// Fictional counterparts (controls that must pass).
const fakeSsn = () => `9${pad(int(0, 99), 2)}-${pad(int(1, 99), 2)}-${pad(int(1, 9999), 4)}`;
const fakePhone = () =>
  formatPhone([String(pick(AREA_CODES)), '555', `01${pad(int(0, 99), 2)}`], pick([0, 1, 3, 4]));
const fakeEmail = () =>
  `${pick(FIRST)}.${pick(LAST)}@${pick(['example.com', 'example.org', 'clinic.example', 'mail.test'])}`;
const fakeMbi = () => `1S${realMbi().slice(2)}`;

// ---- the data ---------------------------------------------------------------------------------

if (!fs.existsSync(flags.synthea)) {
  console.error(`bench: ${flags.synthea} not found (see ../shared/data/synthea-r4/README.md)`);
  process.exit(2);
}
const files = fs
  .readdirSync(flags.synthea)
  .filter((f) => f.endsWith('.json'))
  .sort();
const resources: Json[] = [];
for (const f of files) {
  const bundle = JSON.parse(fs.readFileSync(path.join(flags.synthea, f), 'utf8')) as {
    entry?: { resource: Json }[];
  };
  for (const e of bundle.entry ?? []) resources.push(e.resource);
}

// 1 and 3: false positives and cost on every Synthea resource.
const timings: number[] = [];
const falsePositives: { type: string; kinds: PhiKind[] }[] = [];
for (let round = 0; round < 2; round++) {
  // Round 0 warms the JIT; round 1 is measured.
  for (const r of resources) {
    const t0 = process.hrtime.bigint();
    const findings = detectRealLookingPhi(r);
    const dt = Number(process.hrtime.bigint() - t0);
    if (round === 1) {
      timings.push(dt);
      if (findings.length > 0)
        falsePositives.push({ type: r.resourceType, kinds: findings.map((f) => f.kind) });
    }
  }
}
const sorted = [...timings].sort((a, b) => a - b);
const q = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]! / 1000;
const totalMs = timings.reduce((a, b) => a + b, 0) / 1e6;
const bytes = resources.reduce((a, r) => a + JSON.stringify(r).length, 0);

// 2: the realistic set.
const clone = <T>(x: T): T => structuredClone(x);
const patients = resources.filter((r) => r.resourceType === 'Patient');
const noteTargets = resources.filter((r) =>
  ['Observation', 'Condition', 'Procedure', 'Encounter', 'AllergyIntolerance', 'Immunization'].includes(
    r.resourceType,
  ),
);
const xhtml = (s: string) => `<div xmlns="http://www.w3.org/1999/xhtml">${s}</div>`;

interface Case {
  category: string;
  set: 'realistic' | 'control' | 'hard';
  kind: PhiKind;
  path: string;
  resource: Json;
}

function noteCase(category: string, set: Case['set'], kind: PhiKind, sentence: string): Case {
  const r = clone(pick(noteTargets));
  // Immunization and Procedure take note too; Encounter has none in R4: use its reasonCode text.
  if (r.resourceType === 'Encounter') {
    r.reasonCode = [{ text: sentence }];
    return { category, set, kind, path: 'Encounter.reasonCode[0].text', resource: r };
  }
  r.note = [...(r.note ?? []), { text: sentence }];
  return { category, set, kind, path: `${r.resourceType}.note[${r.note.length - 1}].text`, resource: r };
}

function patientCase(category: string, set: Case['set'], kind: PhiKind, mutate: (p: Json) => string): Case {
  const p = clone(pick(patients));
  return { category, set, kind, path: mutate(p), resource: p };
}

function ssnIdentifier(p: Json, value: string): string {
  const i = (p.identifier as Json[]).findIndex((x) => x.system === US_SSN_SYSTEM);
  p.identifier[i].value = value;
  return `Patient.identifier[${i}].value`;
}
function addTelecom(p: Json, system: string, value: string): string {
  p.telecom = [...(p.telecom ?? []), { system, value, use: pick(['home', 'mobile', 'work']) }];
  return `Patient.telecom[${p.telecom.length - 1}].value`;
}
function phoneTelecom(p: Json, value: string): string {
  const i = (p.telecom as Json[]).findIndex((x) => x.system === 'phone');
  p.telecom[i].value = value;
  return `Patient.telecom[${i}].value`;
}
function contactPhone(p: Json, value: string): string {
  p.contact = [
    {
      relationship: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v2-0131', code: 'N' }] }],
      name: { family: pick(LAST), given: [pick(FIRST)] },
      telecom: [{ system: 'phone', value }],
    },
  ];
  return 'Patient.contact[0].telecom[0].value';
}
function mbiIdentifier(p: Json, value: string): string {
  p.identifier.push({ system: US_MBI_SYSTEM, value });
  return `Patient.identifier[${p.identifier.length - 1}].value`;
}
function narrative(p: Json, sentence: string): string {
  p.text = { status: 'generated', div: xhtml(`${pick(FIRST)} ${pick(LAST)}. ${sentence}`) };
  return 'Patient.text.div';
}
function attachmentCase(set: Case['set'], kind: PhiKind, sentence: string): Case {
  const subject = pick(patients);
  const note = `Progress note.\nSubjective: follow-up visit, doing well.\n${sentence}\nPlan: return in 3 months.`;
  return {
    category: `attachment-${kind}`,
    set,
    kind,
    path: 'DocumentReference.content[0].attachment.data',
    resource: {
      resourceType: 'DocumentReference',
      status: 'current',
      subject: { reference: `Patient/${subject.id}` },
      content: [{ attachment: { contentType: 'text/plain', data: Buffer.from(note).toString('base64') } }],
    },
  };
}

const PER_CATEGORY = 200;
const builders: [string, Case['set'], () => Case][] = [
  // Structured elements.
  [
    'identifier-ssn-dashed',
    'realistic',
    () => patientCase('', 'realistic', 'ssn', (p) => ssnIdentifier(p, realSsn())),
  ],
  [
    'identifier-ssn-digits',
    'realistic',
    () => patientCase('', 'realistic', 'ssn', (p) => ssnIdentifier(p, realSsn().replace(/-/g, ''))),
  ],
  [
    'identifier-mbi',
    'realistic',
    () => patientCase('', 'realistic', 'mbi', (p) => mbiIdentifier(p, realMbi())),
  ],
  [
    'telecom-phone',
    'realistic',
    () => patientCase('', 'realistic', 'phone', (p) => phoneTelecom(p, realPhone())),
  ],
  [
    'telecom-email',
    'realistic',
    () => patientCase('', 'realistic', 'email', (p) => addTelecom(p, 'email', realEmail())),
  ],
  [
    'contact-phone',
    'realistic',
    () => patientCase('', 'realistic', 'phone', (p) => contactPhone(p, realPhone())),
  ],
  // Free text.
  [
    'narrative-ssn',
    'realistic',
    () => patientCase('', 'realistic', 'ssn', (p) => narrative(p, `SSN: ${realSsn()}.`)),
  ],
  [
    'narrative-phone',
    'realistic',
    () => patientCase('', 'realistic', 'phone', (p) => narrative(p, `Home phone ${realPhoneText()}.`)),
  ],
  [
    'note-phone',
    'realistic',
    () => noteCase('', 'realistic', 'phone', `Daughter can be reached at ${realPhoneText()} after 5pm.`),
  ],
  [
    'note-email',
    'realistic',
    () => noteCase('', 'realistic', 'email', `Patient prefers results by e-mail to ${realEmail()}.`),
  ],
  [
    'note-ssn-keyword',
    'realistic',
    () => noteCase('', 'realistic', 'ssn', `Insurance verified, SS# ${realSsn().replace(/-/g, '')}.`),
  ],
  ['note-mbi', 'realistic', () => noteCase('', 'realistic', 'mbi', `Medicare MBI ${realMbi()} on file.`)],
  [
    'note-card',
    'realistic',
    () => noteCase('', 'realistic', 'payment-card', `Copay charged to card ${realCard()}.`),
  ],
  [
    'attachment-phone',
    'realistic',
    () => attachmentCase('realistic', 'phone', `Call back at ${realPhoneText()}.`),
  ],
  ['attachment-ssn', 'realistic', () => attachmentCase('realistic', 'ssn', `SSN ${realSsn()} verified.`)],
  // Controls: the same places with fictional values must pass.
  [
    'control-identifier-ssn',
    'control',
    () => patientCase('', 'control', 'ssn', (p) => ssnIdentifier(p, fakeSsn())),
  ],
  [
    'control-telecom-phone',
    'control',
    () => patientCase('', 'control', 'phone', (p) => phoneTelecom(p, fakePhone())),
  ],
  [
    'control-telecom-email',
    'control',
    () => patientCase('', 'control', 'email', (p) => addTelecom(p, 'email', fakeEmail())),
  ],
  [
    'control-identifier-mbi',
    'control',
    () => patientCase('', 'control', 'mbi', (p) => mbiIdentifier(p, fakeMbi())),
  ],
  [
    'control-note',
    'control',
    () =>
      noteCase(
        '',
        'control',
        'phone',
        `Call ${fakePhone()} or write to ${fakeEmail()}; SSN ${fakeSsn()}; card 4111 1111 1111 1111.`,
      ),
  ],
  // Hard: formats the rules leave alone by design (docs/phi-boundary.md).
  [
    'hard-note-ssn-bare',
    'hard',
    () => noteCase('', 'hard', 'ssn', `Verified number ${realSsn().replace(/-/g, '')} with the payer.`),
  ],
  [
    'hard-note-phone-bare',
    'hard',
    () => noteCase('', 'hard', 'phone', `Reach her at ${realPhoneParts().join('')} after 5pm.`),
  ],
  [
    'hard-note-email-obfuscated',
    'hard',
    () => noteCase('', 'hard', 'email', `Email ${pick(FIRST)} dot ${pick(LAST)} at gmail dot com.`),
  ],
  [
    'hard-telecom-international',
    'hard',
    () =>
      patientCase('', 'hard', 'phone', (p) => phoneTelecom(p, `+44 20 7${int(100, 999)} ${int(1000, 9999)}`)),
  ],
];

interface Score {
  category: string;
  set: Case['set'];
  cases: number;
  flagged: number;
}
const scores: Score[] = [];
for (const [category, set, build] of builders) {
  let flagged = 0;
  for (let i = 0; i < PER_CATEGORY; i++) {
    const c = build();
    const findings = detectRealLookingPhi(c.resource);
    const hit =
      set === 'control' ? findings.length > 0 : findings.some((f) => f.kind === c.kind && f.path === c.path);
    if (hit) flagged++;
  }
  scores.push({ category, set, cases: PER_CATEGORY, flagged });
}
const sum = (set: Case['set']) =>
  scores
    .filter((s) => s.set === set)
    .reduce((a, s) => ({ cases: a.cases + s.cases, flagged: a.flagged + s.flagged }), {
      cases: 0,
      flagged: 0,
    });
const realistic = sum('realistic');
const control = sum('control');
const hard = sum('hard');

// 4 and 5: corpora written by others (../shared/data), read where they are.
const shared = path.join(repoRoot, '..', 'shared', 'data');
const KIND_OF: Record<string, PhiKind> = {
  SSN: 'ssn',
  US_SSN: 'ssn',
  PHONE: 'phone',
  FAX: 'phone',
  PHONE_NUMBER: 'phone',
  EMAIL: 'email',
  EMAIL_ADDRESS: 'email',
  CREDIT_CARD: 'payment-card',
};
/** A note as FHIR carries it: the text of an Observation's note, in a Synthea Observation. */
const observationTemplate = resources.find((r) => r.resourceType === 'Observation')!;
function noteKinds(text: string): PhiKind[] {
  const r = clone(observationTemplate);
  r.note = [{ text }];
  return detectRealLookingPhi(r)
    .filter((f) => f.path === 'Observation.note[0].text')
    .map((f) => f.kind);
}
interface Tally {
  cases: number;
  caught: number;
}
const tally = (): Tally => ({ cases: 0, caught: 0 });

// deid-dev: 100 synthetic clinical notes by another author, PHI spans labelled, written with the
// fictional conventions (SSN 9xx, 555-01xx, example.com). (a) Flags on the notes as they are: a
// flag no labelled span explains is a false positive. (b) Each full SSN, phone, fax and e-mail span
// made real in its own format, one at a time: the catch rate on someone else's formats.
const deidFile = path.join(shared, 'deid-dev', 'notes.jsonl');
const deid = {
  present: fs.existsSync(deidFile),
  notes: 0,
  notesFlagged: 0,
  unexplainedFlags: 0,
  flaggedBecause: {} as Record<string, number>,
  madeReal: {} as Record<string, Tally>,
};
function makeReal(type: string, text: string): string | undefined {
  if (type === 'SSN') {
    if (!/^\d{3}-?\d{2}-?\d{4}$/.test(text)) return undefined; // masked (XXX-XX-1234): not a full SSN
    const real = realSsn();
    return text.includes('-') ? real : real.replace(/-/g, '');
  }
  if (type === 'PHONE' || type === 'FAX') {
    const m = /555([\s.-]?)01\d\d/.exec(text);
    if (!m) return undefined;
    const [, nxx, line] = realPhoneParts();
    return text.replace(m[0], `${nxx}${m[1]}${line}`);
  }
  if (type === 'EMAIL') return text.replace(/@.*$/, `@${pick(MAIL_DOMAINS)}`);
  return undefined;
}
if (deid.present) {
  for (const line of fs.readFileSync(deidFile, 'utf8').split('\n').filter(Boolean)) {
    const note = JSON.parse(line) as {
      text: string;
      spans: { start: number; end: number; type: string; text: string }[];
    };
    deid.notes++;
    const kinds = noteKinds(note.text);
    if (kinds.length > 0) deid.notesFlagged++;
    for (const k of kinds) {
      const because = note.spans.find((s) => noteKinds(s.text).includes(k));
      if (because)
        deid.flaggedBecause[`${k} in ${because.type}`] =
          (deid.flaggedBecause[`${k} in ${because.type}`] ?? 0) + 1;
      else deid.unexplainedFlags++;
    }
    for (const span of note.spans) {
      const kind = KIND_OF[span.type];
      const real = kind && makeReal(span.type, span.text);
      if (!kind || !real) continue;
      const t = (deid.madeReal[span.type] ??= tally());
      t.cases++;
      if (noteKinds(note.text.slice(0, span.start) + real + note.text.slice(span.end)).includes(kind))
        t.caught++;
    }
  }
}

// presidio-research-synth: 1,500 general-domain sentences whose SSNs, phones, e-mails and card
// numbers were generated (Faker) by Microsoft's presidio-research, not by us: catch rate per type.
// Phones there are from many countries: the NANP-shaped ones (ten digits, a plausible area code)
// are counted apart, as the phone rule judges only those. Flags in sentences with none of these
// types are counted as false positives.
const presidioFile = path.join(shared, 'presidio-research-synth', 'synth_dataset_v2.json');
const presidio = {
  present: fs.existsSync(presidioFile),
  sentences: 0,
  byType: {} as Record<string, Tally>,
  sentencesWithoutThoseTypes: 0,
  flaggedWithoutThoseTypes: 0,
};
if (presidio.present) {
  const data = JSON.parse(fs.readFileSync(presidioFile, 'utf8')) as {
    full_text: string;
    spans: { entity_type: string; entity_value: string }[];
  }[];
  for (const d of data) {
    presidio.sentences++;
    const relevant = d.spans.filter((s) => KIND_OF[s.entity_type]);
    if (relevant.length === 0) {
      presidio.sentencesWithoutThoseTypes++;
      if (noteKinds(d.full_text).length > 0) presidio.flaggedWithoutThoseTypes++;
      continue;
    }
    for (const s of relevant) {
      let type = s.entity_type;
      if (type === 'PHONE_NUMBER') {
        // NANP format: NPA NXX XXXX in three groups (or ten digits), once a leading +1/1 and an
        // extension (x123) are set aside.
        const core = s.entity_value
          .trim()
          .replace(/x\d+$/i, '')
          .replace(/^\+?1[\s.-]?(?=\(?\d{3})/, '');
        const nanpFormat = /^(?:\(\d{3}\)\s?|\d{3}[\s.-]?)\d{3}[\s.-]?\d{4}$/.test(core);
        type = !nanpFormat
          ? 'PHONE_NUMBER (other countries)'
          : isDiallableNanp(core.replace(/\D/g, ''))
            ? 'PHONE_NUMBER (NANP, diallable)'
            : 'PHONE_NUMBER (NANP format, not diallable)';
      }
      // One span at a time: the other SSNs, phones, e-mails and cards of the sentence are blanked.
      let text = d.full_text;
      for (const other of relevant) if (other !== s) text = text.split(other.entity_value).join('[redacted]');
      const t = (presidio.byType[type] ??= tally());
      t.cases++;
      if (noteKinds(text).includes(KIND_OF[s.entity_type]!)) t.caught++;
    }
  }
}

const result = {
  seed: Number(flags.seed),
  synthea: {
    bundles: files.length,
    resources: resources.length,
    falsePositives: falsePositives.length,
    falsePositiveRate: falsePositives.length / resources.length,
    falsePositiveTypes: [...new Set(falsePositives.map((f) => `${f.type}:${f.kinds.join('+')}`))],
  },
  catchRate: {
    realistic: { ...realistic, rate: realistic.flagged / realistic.cases },
    controlsFlagged: { ...control, rate: control.flagged / control.cases },
    hard: { ...hard, rate: hard.flagged / hard.cases },
    byCategory: scores,
  },
  deidDev: deid,
  presidioSynth: presidio,
  cost: {
    resources: timings.length,
    meanMicros: (totalMs * 1000) / timings.length,
    p50Micros: q(0.5),
    p99Micros: q(0.99),
    maxMicros: q(1),
    totalMs,
    megabytesPerSecond: bytes / 1e6 / (totalMs / 1000),
  },
  node: process.version,
};

if (flags.json) {
  console.log(JSON.stringify(result, null, 2));
} else {
  const pct = (n: number) => `${(100 * n).toFixed(2)}%`;
  console.log(`PHI detector score (seed ${result.seed}, ${result.node})`);
  console.log(
    `false positives on Synthea: ${result.synthea.falsePositives} of ${result.synthea.resources} resources ` +
      `(${pct(result.synthea.falsePositiveRate)}) in ${result.synthea.bundles} bundles`,
  );
  if (result.synthea.falsePositiveTypes.length)
    console.log(`  flagged: ${result.synthea.falsePositiveTypes.join(', ')}`);
  console.log(
    `catch rate, realistic set: ${realistic.flagged}/${realistic.cases} (${pct(result.catchRate.realistic.rate)}); ` +
      `fictional controls flagged: ${control.flagged}/${control.cases}; hard set (by design): ${hard.flagged}/${hard.cases}`,
  );
  console.log('| category | set | caught (controls: flagged) |');
  console.log('|---|---|---|');
  for (const s of scores) console.log(`| ${s.category} | ${s.set} | ${s.flagged}/${s.cases} |`);
  if (deid.present) {
    console.log(
      `deid-dev notes as written (fictional values): ${deid.notesFlagged}/${deid.notes} notes flagged, ` +
        `${deid.unexplainedFlags} flags without a labelled PHI span; flagged because: ${JSON.stringify(deid.flaggedBecause)}`,
    );
    console.log(
      `deid-dev spans made real one at a time: ${Object.entries(deid.madeReal)
        .map(([k, t]) => `${k} ${t.caught}/${t.cases}`)
        .join(', ')}`,
    );
  } else console.log('deid-dev: not present, skipped');
  if (presidio.present) {
    console.log(
      `presidio-research-synth (${presidio.sentences} sentences): ${Object.entries(presidio.byType)
        .map(([k, t]) => `${k} ${t.caught}/${t.cases}`)
        .join(
          ', ',
        )}; flagged without such a span: ${presidio.flaggedWithoutThoseTypes}/${presidio.sentencesWithoutThoseTypes}`,
    );
  } else console.log('presidio-research-synth: not present, skipped');
  const c = result.cost;
  console.log(
    `cost per resource: mean ${c.meanMicros.toFixed(1)} µs, p50 ${c.p50Micros.toFixed(1)} µs, p99 ${c.p99Micros.toFixed(1)} µs, ` +
      `max ${c.maxMicros.toFixed(0)} µs; ${c.resources} resources in ${c.totalMs.toFixed(0)} ms (${c.megabytesPerSecond.toFixed(1)} MB/s of JSON)`,
  );
}
