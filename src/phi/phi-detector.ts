import type { IssueDetail } from '../kernel/errors.ts';

/**
 * The sandbox PHI detector (issue 7; docs/phi-boundary.md). Sandbox projects accept only test data
 * labelled HTEST; this looks through every string of a labelled resource for values that look
 * real — numbers that could have been issued or dialled, mailboxes that could exist — and reports
 * where they are and what kind they are, never the value.
 *
 * The rules are structural on purpose: they need no lookup tables that go stale, and where the
 * structure leaves doubt they lean towards refusing, because the fictional ranges are easy to use
 * (SSN area 9xx, phone 555-01xx, mailboxes at example.com).
 *
 * @example
 * detectRealLookingPhi({ resourceType: 'Patient', telecom: [{ system: 'phone', value: '617-253-1000' }] })
 * // → [{ path: 'Patient.telecom[0].value', kind: 'phone', where: 'telecom' }]
 */

/** What a finding looks like. */
export type PhiKind = 'ssn' | 'phone' | 'email' | 'mbi' | 'payment-card';

/** Where it was found: a structured element (identifier, telecom) or free text (any other string). */
export type PhiWhere = 'identifier' | 'telecom' | 'text';

export interface PhiFinding {
  /** FHIRPath-like location, e.g. `Patient.identifier[2].value`, `Patient.text.div`. */
  path: string;
  kind: PhiKind;
  where: PhiWhere;
}

export const US_SSN_SYSTEM = 'http://hl7.org/fhir/sid/us-ssn';
/** The SSN's OID (as used in CDA and some FHIR feeds). */
const US_SSN_OID = 'urn:oid:2.16.840.1.113883.4.1';
export const US_MBI_SYSTEM = 'http://hl7.org/fhir/sid/us-mbi';
const V2_0203 = 'http://terminology.hl7.org/CodeSystem/v2-0203';

/**
 * Resource types that describe organisations and their staff (a provider directory). Their phone
 * numbers and e-mail addresses are business contact details, not PHI, and real ones are normal in
 * test data: Synthea's Organizations carry the public numbers of real Massachusetts hospitals. The
 * phone and e-mail rules skip them; the SSN, MBI and payment-card rules do not.
 */
export const DIRECTORY_RESOURCE_TYPES: ReadonlySet<string> = new Set([
  'Organization',
  'OrganizationAffiliation',
  'Location',
  'HealthcareService',
  'Endpoint',
  'Practitioner',
  'PractitionerRole',
  'InsurancePlan',
]);

/** Upper bound on the findings reported for one resource (the OperationOutcome stays small). */
export const MAX_FINDINGS = 20;

/** Decoded size up to which a text attachment (`Attachment.data`, `Binary.data`) is inspected. */
const MAX_ATTACHMENT_BYTES = 2 * 1024 * 1024;

// ---- the rules, one value at a time --------------------------------------------------------

/**
 * Could the Social Security Administration have issued these nine digits? SSA never issues area
 * 000, 666 or 900–999, group 00 or serial 0000 (https://www.ssa.gov/employer/randomization.html;
 * https://www.ssa.gov/history/ssn/geocard.html). Everything else could be a real person's number.
 */
export function isIssuableSsn(nineDigits: string): boolean {
  if (!/^\d{9}$/.test(nineDigits)) return false;
  const area = Number(nineDigits.slice(0, 3));
  const group = Number(nineDigits.slice(3, 5));
  const serial = Number(nineDigits.slice(5));
  return area !== 0 && area !== 666 && area < 900 && group !== 0 && serial !== 0;
}

/**
 * Is `digits` a North American Numbering Plan number that could be dialled? Ten digits (or eleven
 * with the country code 1) NPA-NXX-XXXX, or seven NXX-XXXX (a local number: dialled within an area).
 *
 * Area code (NPA): first digit 2–9; not an N11 service code; not N9X (reserved for expanding the
 * plan), 37X or 96X (reserved), nor 555 (not assigned; Synthea writes its fictional numbers as
 * 555-NXX-XXXX). Toll-free and other non-geographic codes (800, 888, 500, …) can be dialled, so
 * they count. Exchange (NXX): first digit 2–9 and not N11. Exchange 555 counts as fictional:
 * 555-0100…0199 is reserved for fiction and the rest of 555 is directory assistance or unused,
 * which is how film and test data use it (issue 7: "an exchange other than 555").
 */
export function isDiallableNanp(digits: string): boolean {
  let d = digits;
  if (d.length === 11 && d.startsWith('1')) d = d.slice(1);
  if (d.length === 10) {
    const npa = d.slice(0, 3);
    if (!/^[2-9]\d\d$/.test(npa)) return false;
    if (npa[1] === '1' && npa[2] === '1') return false;
    if (npa[1] === '9' || npa.startsWith('37') || npa.startsWith('96') || npa === '555') return false;
    d = d.slice(3);
  }
  if (d.length !== 7) return false;
  const nxx = d.slice(0, 3);
  if (!/^[2-9]\d\d$/.test(nxx)) return false;
  if (nxx[1] === '1' && nxx[2] === '1') return false;
  return nxx !== '555';
}

/**
 * Domains reserved so that they never reach a real mailbox: example.com, .net and .org and their
 * subdomains (RFC 2606 §3), and the top-level names example, test, invalid and localhost (RFC 2606
 * §2, RFC 6761 §6). Any other domain could deliver to someone.
 */
export function isReservedEmailDomain(domain: string): boolean {
  const d = domain.toLowerCase().replace(/\.$/, '');
  if (d === 'localhost') return true;
  for (const reserved of ['example.com', 'example.net', 'example.org']) {
    if (d === reserved || d.endsWith(`.${reserved}`)) return true;
  }
  const tld = d.slice(d.lastIndexOf('.') + 1);
  return tld === 'example' || tld === 'test' || tld === 'invalid' || tld === 'localhost';
}

/** MBI letters: A–Z without S, L, O, I, B and Z (CMS never uses them). */
const MBI_ALPHA = 'AC-HJKMNP-RT-Y';
const MBI_RE = new RegExp(
  `^[1-9][${MBI_ALPHA}][${MBI_ALPHA}0-9]\\d[${MBI_ALPHA}][${MBI_ALPHA}0-9]\\d[${MBI_ALPHA}]{2}\\d\\d$`,
);

/**
 * Is this (dashes removed, upper case) a well-formed Medicare Beneficiary Identifier? CMS's format
 * (https://www.cms.gov/medicare/new-medicare-card/understanding-the-mbi.pdf): 11 characters,
 * C A AN N A AN N A A N N, letters never S, L, O, I, B or Z. There is no reserved fictional range,
 * so test data should break the format on purpose, e.g. with an S in the second position.
 */
export function isWellFormedMbi(value: string): boolean {
  return MBI_RE.test(value);
}

/** Card numbers published by the card networks and payment processors for testing. */
const TEST_CARD_NUMBERS = new Set([
  '4111111111111111',
  '4242424242424242',
  '4012888888881881',
  '4000056655665556',
  '5555555555554444',
  '5105105105105100',
  '2223003122003222',
  '378282246310005',
  '371449635398431',
  '6011111111111117',
  '6011000990139424',
  '3530111333300000',
  '30569309025904',
  '38520000023237',
]);

/**
 * Does this digit string look like a payment card number (PAN) that could be real: 12–19 digits,
 * a card network's issuer prefix (Visa 4, Mastercard 51–55 and 2221–2720, Amex 34/37, Discover
 * 6011/644–649/65, JCB 3528–3589 and the 15-digit 1800/2131, Diners 300–305/36/38, Maestro 50 and
 * 56–69 from 12 digits) and a valid Luhn check digit, and not one of the networks' published test
 * numbers.
 */
export function isPlausibleCardNumber(digits: string): boolean {
  if (!/^\d{12,19}$/.test(digits) || TEST_CARD_NUMBERS.has(digits)) return false;
  const p2 = Number(digits.slice(0, 2));
  const p3 = Number(digits.slice(0, 3));
  const p4 = Number(digits.slice(0, 4));
  const maestro = p2 === 50 || (p2 >= 56 && p2 <= 69);
  if (digits.length === 12 && !maestro) return false;
  const issuer =
    maestro ||
    (digits.length === 15 && (p4 === 1800 || p4 === 2131)) ||
    digits[0] === '4' ||
    (p2 >= 51 && p2 <= 55) ||
    (p4 >= 2221 && p4 <= 2720) ||
    p2 === 34 ||
    p2 === 37 ||
    p4 === 6011 ||
    (p3 >= 644 && p3 <= 649) ||
    p2 === 65 ||
    (p4 >= 3528 && p4 <= 3589) ||
    (p3 >= 300 && p3 <= 305) ||
    p2 === 36 ||
    p2 === 38;
  return issuer && luhnValid(digits);
}

function luhnValid(digits: string): boolean {
  let sum = 0;
  for (let i = 0; i < digits.length; i++) {
    let n = digits.charCodeAt(digits.length - 1 - i) - 48;
    if (i % 2 === 1) {
      n *= 2;
      if (n > 9) n -= 9;
    }
    sum += n;
  }
  return sum % 10 === 0;
}

// ---- free text -----------------------------------------------------------------------------

// Formatted SSNs: AAA-GG-SSSS or AAA GG SSSS, not inside a longer token.
const TEXT_SSN = /(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])/g;
// Unformatted SSNs only next to a keyword (nine bare digits are too often something else).
const TEXT_SSN_KEYWORD =
  /\b(?:SSN|SS#|SS\s?No\.?|social\s+security(?:\s+(?:number|no\.?|#))?)\W{0,6}(\d{9})(?!\d)/gi;
// NANP numbers with separators: (617) 253-1000, 617-253-1000, 617.253.1000, 617 253 1000, +1 …,
// with or without an extension (617-253-1000x123).
const TEXT_PHONE =
  /(?<![\w+-])(?:\+?1[\s.-]?)?(?:\((\d{3})\)\s?|(\d{3})[\s.-])(\d{3})[\s.-](\d{4})(?!\d|[-.]\d)/g;
// E.164 without separators: +16172531000.
const TEXT_PHONE_E164 = /(?<![\w+])\+1(\d{10})(?!\d)/g;
// Bare ten digits only next to a keyword.
const TEXT_PHONE_KEYWORD =
  /\b(?:phone|tel|telephone|cell|mobile|fax|call|contact|ph|pager|sms|text)\b\W{0,12}1?(\d{10})(?!\d)/gi;
const TEXT_EMAIL = /[A-Za-z0-9._%+-]+@([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+)/g;
const TEXT_MBI = new RegExp(
  `(?<![A-Za-z0-9-])[1-9][${MBI_ALPHA}][${MBI_ALPHA}0-9]\\d-?[${MBI_ALPHA}][${MBI_ALPHA}0-9]\\d-?[${MBI_ALPHA}]{2}\\d\\d(?![A-Za-z0-9-])`,
  'g',
);
// Card numbers written in groups of four (16–19 digits) or Amex's 4-6-5.
const TEXT_CARD_GROUPED = /(?<![\w-])(?:\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\w-])/g;
// Ungrouped card numbers only next to a keyword.
const TEXT_CARD_KEYWORD =
  /\b(?:card|visa|mastercard|master\s+card|maestro|amex|american\s+express|discover|jcb|credit|debit|cc|pan)\b\D{0,20}?(\d{12,19})(?!\d)/gi;

interface TextRules {
  /** Phone and e-mail rules apply (not in directory resources). */
  contact: boolean;
}

// Strings no free-text rule can match, skipped before any rule runs: digits only (codes, numbers:
// every rule needs a separator, a keyword, a '+' or letters), FHIR dates and times, UUIDs and
// references to them.
const ONLY_DIGITS = /^\d+$/;
const DATE_OR_TIME =
  /^\d{4}(?:-\d{2}(?:-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?$/;
const UUID_REF = /^(?:urn:uuid:|[A-Za-z]+\/)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function digitCount(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c >= 48 && c <= 57) n++;
  }
  return n;
}

/** The kinds found in one free-text string (each kind at most once). */
export function scanText(text: string, rules: TextRules = { contact: true }): PhiKind[] {
  const hasAt = rules.contact && text.includes('@');
  const digits = digitCount(text);
  // Every digit rule needs at least five digits (an MBI); most strings have fewer and no '@'.
  if (digits < 5 && !hasAt) return [];
  if (!hasAt && (ONLY_DIGITS.test(text) || DATE_OR_TIME.test(text) || UUID_REF.test(text))) return [];
  const found = new Set<PhiKind>();
  if (digits >= 5 && /[A-Z]/.test(text)) {
    for (const m of text.matchAll(TEXT_MBI)) {
      if (isWellFormedMbi(m[0].replace(/-/g, ''))) {
        found.add('mbi');
        break;
      }
    }
  }
  // SSNs have nine digits, NANP numbers ten (free text needs the area code), card numbers twelve.
  if (digits >= 9) {
    for (const m of text.matchAll(TEXT_SSN)) {
      if (isIssuableSsn(m[1]! + m[3]! + m[4]!)) {
        found.add('ssn');
        break;
      }
    }
    if (!found.has('ssn')) {
      for (const m of text.matchAll(TEXT_SSN_KEYWORD)) {
        if (isIssuableSsn(m[1]!)) {
          found.add('ssn');
          break;
        }
      }
    }
    if (rules.contact && digits >= 10) {
      for (const m of text.matchAll(TEXT_PHONE)) {
        if (isDiallableNanp((m[1] ?? m[2]!) + m[3]! + m[4]!)) {
          found.add('phone');
          break;
        }
      }
      if (!found.has('phone')) {
        for (const re of [TEXT_PHONE_E164, TEXT_PHONE_KEYWORD]) {
          for (const m of text.matchAll(re)) {
            if (isDiallableNanp(m[1]!)) {
              found.add('phone');
              break;
            }
          }
        }
      }
    }
    for (const re of digits >= 12 ? [TEXT_CARD_GROUPED, TEXT_CARD_KEYWORD] : []) {
      if (found.has('payment-card')) break;
      for (const m of text.matchAll(re)) {
        const digits = (re === TEXT_CARD_KEYWORD ? m[1]! : m[0]).replace(/\D/g, '');
        if (isPlausibleCardNumber(digits)) {
          found.add('payment-card');
          break;
        }
      }
    }
  }
  if (hasAt) {
    for (const m of text.matchAll(TEXT_EMAIL)) {
      if (!isReservedEmailDomain(m[1]!)) {
        found.add('email');
        break;
      }
    }
  }
  return [...found];
}

// ---- the walk over a resource --------------------------------------------------------------

type Json = Record<string, unknown>;

function codings(o: Json): { system?: unknown; code?: unknown }[] {
  const type = o.type as { coding?: unknown } | undefined;
  return Array.isArray(type?.coding) ? (type.coding as { system?: unknown; code?: unknown }[]) : [];
}

function identifierKind(o: Json): 'ssn' | 'mbi' | undefined {
  const system = o.system;
  if (system === US_SSN_SYSTEM || system === US_SSN_OID) return 'ssn';
  if (system === US_MBI_SYSTEM) return 'mbi';
  for (const c of codings(o)) {
    if (c?.system !== V2_0203) continue;
    if (c.code === 'SS') return 'ssn';
    if (c.code === 'MC') return 'mbi';
  }
  return undefined;
}

const TEXT_CONTENT_TYPE =
  /^(?:text\/|application\/(?:fhir\+)?(?:json|xml)|application\/(?:x-)?rtf|application\/xhtml)/i;

/**
 * Inspects every string of a resource (contained resources and Bundle entries included) and
 * returns what looks real, with the element's path and the kind, never the value. At most
 * MAX_FINDINGS findings; each path and kind once.
 *
 * Structured elements get exact rules: an Identifier whose system is the SSN's (or typed SS) is an
 * SSN with or without dashes; one whose system is the MBI's (or typed MC) an MBI; a ContactPoint's
 * value is a phone number (phone, fax, sms, pager) or an e-mail address in whatever format. Every
 * other string is free text, where only formats that are unambiguous count (docs/phi-boundary.md).
 * Text attachments (`Attachment.data`, `Binary.data` with a text content type) are decoded and
 * read as free text.
 */
export function detectRealLookingPhi(resource: unknown): PhiFinding[] {
  const findings: PhiFinding[] = [];
  const seen = new Set<string>();
  const path: string[] = [];
  const report = (kind: PhiKind, where: PhiWhere, leaf: string) => {
    if (findings.length >= MAX_FINDINGS) return;
    const p = path.join('') + leaf;
    const key = `${kind}|${p}`;
    if (seen.has(key)) return;
    seen.add(key);
    findings.push({ path: p, kind, where });
  };
  const text = (s: string, resourceType: string, leaf: string) => {
    for (const kind of scanText(s, { contact: !DIRECTORY_RESOURCE_TYPES.has(resourceType) })) {
      report(kind, 'text', leaf);
    }
  };

  const visit = (v: unknown, resourceType: string, parentKey: string): void => {
    if (findings.length >= MAX_FINDINGS) return;
    if (Array.isArray(v)) {
      for (let i = 0; i < v.length; i++) {
        const item = v[i];
        if (typeof item === 'string') {
          if (parentKey !== 'system' && parentKey !== 'url') text(item, resourceType, `[${i}]`);
          continue;
        }
        path.push(`[${i}]`);
        visit(item, resourceType, parentKey);
        path.pop();
      }
      return;
    }
    if (v === null || typeof v !== 'object') return;
    const o = v as Json;
    const rt = typeof o.resourceType === 'string' ? o.resourceType : resourceType;
    if (path.length === 0) path.push(rt);
    const value = typeof o.value === 'string' ? o.value : undefined;
    // Structured elements: the value is judged by its element's meaning, in any format.
    let structured = false;
    if (value !== undefined) {
      const idKind = identifierKind(o);
      if (idKind === 'ssn') {
        structured = true;
        const digits = value.replace(/[\s-]/g, '');
        if (isIssuableSsn(digits)) report('ssn', 'identifier', '.value');
      } else if (idKind === 'mbi') {
        structured = true;
        if (isWellFormedMbi(value.replace(/[\s-]/g, '').toUpperCase())) report('mbi', 'identifier', '.value');
      } else if (
        (parentKey === 'telecom' || parentKey === 'valueContactPoint') &&
        !DIRECTORY_RESOURCE_TYPES.has(rt)
      ) {
        const system = o.system;
        if (system === 'phone' || system === 'fax' || system === 'sms' || system === 'pager') {
          structured = true;
          // A number with another country code than 1 is not judged (docs/phi-boundary.md).
          const international = /^\s*(?:\+|00)(?!1)/.test(value);
          if (!international && isDiallableNanp(value.replace(/^\s*(?:\+|00)/, '').replace(/\D/g, ''))) {
            report('phone', 'telecom', '.value');
          }
        } else if (system === 'email') {
          structured = true;
          const at = value.lastIndexOf('@');
          const domain = at >= 0 ? value.slice(at + 1).trim() : '';
          if (domain && !isReservedEmailDomain(domain)) report('email', 'telecom', '.value');
        }
      }
    }
    const attachment =
      typeof o.data === 'string' &&
      typeof o.contentType === 'string' &&
      TEXT_CONTENT_TYPE.test(o.contentType);
    for (const [k, child] of Object.entries(o)) {
      if (typeof child === 'string') {
        if (k === 'system' || k === 'url' || k === 'resourceType' || (k === 'value' && structured)) continue;
        if (k === 'data' && attachment) {
          if ((child.length * 3) / 4 <= MAX_ATTACHMENT_BYTES) {
            text(Buffer.from(child, 'base64').toString('utf8'), rt, '.data');
          }
          continue;
        }
        text(child, rt, `.${k}`);
        continue;
      }
      if (child === null || typeof child !== 'object') continue;
      path.push(`.${k}`);
      visit(child, rt, k);
      path.pop();
    }
  };
  visit(resource, 'Resource', '');
  return findings;
}

const DIAGNOSTICS: Record<PhiKind, string> = {
  ssn:
    'Looks like a Social Security number that could have been issued (area other than 000, 666 and ' +
    '900-999). Test data uses area 900-999.',
  phone:
    'Looks like a phone number that could be dialled (a North American area code and an exchange ' +
    'other than 555). Test data uses 555-0100 to 555-0199.',
  email:
    'Looks like an e-mail address that could reach a mailbox. Test data uses a reserved domain: ' +
    'example.com, example.net, example.org, or a name under .example, .test, .invalid or .localhost.',
  mbi:
    'Looks like a Medicare Beneficiary Identifier (the CMS format). Test data breaks the format, ' +
    'e.g. with an S in the second position.',
  'payment-card':
    'Looks like a payment card number (an issuer prefix and a valid Luhn check digit). Test data ' +
    "uses the card networks' published test numbers.",
};

/** The OperationOutcome issues of a refusal: each element's path and kind, never its value. */
export function phiFindingIssues(findings: readonly PhiFinding[]): IssueDetail[] {
  return findings.map((f) => ({
    severity: 'error',
    code: 'business-rule',
    expression: f.path,
    diagnostics: `${f.kind}: ${DIAGNOSTICS[f.kind]}`,
  }));
}
