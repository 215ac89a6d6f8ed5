/**
 * The one catalog of error codes. Code branches on `code`, never on message text.
 *
 * Each code maps to an HTTP status, a FHIR `IssueType` and an HL7 v2 ACK code. Messages here are
 * fixed text written by us: they may be shown to callers and logged, so they never carry values
 * taken from a request, a resource or a database error (those could be PHI).
 * `test/errors-doc.test.ts` keeps this catalog and docs/errors.md in step.
 */
export const ERROR_CATALOG = {
  BAD_REQUEST: { status: 400, issue: 'invalid', ack: 'AR', message: 'The request is malformed.' },
  INVALID_JSON: {
    status: 400,
    issue: 'structure',
    ack: 'AR',
    message: 'The request body is not valid JSON.',
  },
  JSON_TOO_DEEP: {
    status: 400,
    issue: 'too-costly',
    ack: 'AR',
    message: 'The JSON body is nested too deeply.',
  },
  BODY_TOO_LARGE: { status: 413, issue: 'too-costly', ack: 'AR', message: 'The request body is too large.' },
  UNSUPPORTED_MEDIA_TYPE: {
    status: 415,
    issue: 'not-supported',
    ack: 'AR',
    message: 'Content-Type must be application/fhir+json or application/json.',
  },
  UNKNOWN_RESOURCE_TYPE: {
    status: 404,
    issue: 'not-supported',
    ack: 'AR',
    message: 'Unknown resource type.',
  },
  INVALID_ID: { status: 400, issue: 'value', ack: 'AR', message: 'The id is not a valid FHIR id.' },
  ID_MISMATCH: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message: 'The resource id in the body does not match the id in the URL.',
  },
  TYPE_MISMATCH: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message: 'The resourceType in the body does not match the URL.',
  },
  VALIDATION_FAILED: {
    status: 400,
    issue: 'invalid',
    ack: 'AE',
    message: 'The resource is not valid FHIR R4.',
  },
  NOT_FOUND: { status: 404, issue: 'not-found', ack: 'AE', message: 'Resource not found.' },
  GONE: { status: 410, issue: 'deleted', ack: 'AE', message: 'The resource has been deleted.' },
  VERSION_CONFLICT: {
    status: 412,
    issue: 'conflict',
    ack: 'AE',
    message: 'If-Match does not match the current version of the resource.',
  },
  CONDITIONAL_MULTIPLE: {
    status: 412,
    issue: 'multiple-matches',
    ack: 'AE',
    message: 'The condition matches more than one resource.',
  },
  UNSUPPORTED_CONDITION: {
    status: 400,
    issue: 'not-supported',
    ack: 'AR',
    message: 'The conditional criteria use a parameter this server does not support yet.',
  },
  ROUTE_NOT_FOUND: { status: 404, issue: 'not-found', ack: 'AR', message: 'No such endpoint.' },
  INVALID_PATCH: {
    status: 422,
    issue: 'processing',
    ack: 'AE',
    message: 'The JSON Patch cannot be applied.',
  },
  INVALID_BUNDLE: { status: 400, issue: 'invalid', ack: 'AR', message: 'The Bundle cannot be processed.' },
  SANDBOX_REQUIRES_TEST_LABEL: {
    status: 422,
    issue: 'business-rule',
    ack: 'AR',
    message:
      'This is a sandbox project: it accepts only test data. Label the resource with meta.security ' +
      'system http://terminology.hl7.org/CodeSystem/v3-ActReason code HTEST.',
  },
  SANDBOX_REAL_DATA: {
    status: 422,
    issue: 'business-rule',
    ack: 'AR',
    message:
      'This is a sandbox project: it accepts only test data, and some values look real (the issues name ' +
      'each element and what it looks like). Use fictional values (SSN area 900-999, phone 555-0100 to ' +
      '555-0199, e-mail at example.com) or a production project with a recorded BAA (docs/phi-boundary.md).',
  },
  PROJECT_NOT_FOUND: { status: 404, issue: 'not-found', ack: 'AE', message: 'No such project.' },
  BAA_INVALID: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message:
      'The BAA cannot be recorded: a field is missing or invalid (the issues name each one); nothing was written.',
  },
  VENDOR_INVALID: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message:
      'The vendor, endpoint or vendor BAA cannot be recorded: a field is missing or invalid (the issues name each one); nothing was written.',
  },
  VENDOR_NOT_FOUND: { status: 404, issue: 'not-found', ack: 'AE', message: 'No such vendor.' },
  VENDOR_CONFLICT: {
    status: 409,
    issue: 'conflict',
    ack: 'AE',
    message: 'A vendor of that name, or that endpoint, is already registered; nothing was written.',
  },
  EGRESS_DESTINATION_UNREGISTERED: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message:
      'Outbound request refused: the destination is not a registered vendor endpoint. Nothing was sent.',
  },
  EGRESS_PRIVATE_ADDRESS: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message:
      'Outbound request refused: the destination is (or resolves to) a private, loopback or link-local address not registered for it. Nothing was sent.',
  },
  EGRESS_INSECURE: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message:
      'Outbound request refused: it needs TLS 1.2 or newer with a verified certificate (plain HTTP only to a private endpoint registered for it). Nothing was sent.',
  },
  EGRESS_CLASS_NOT_ALLOWED: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message: 'Outbound request refused: the vendor may not receive this class of data. Nothing was sent.',
  },
  EGRESS_BAA_INACTIVE: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message:
      'Outbound request refused: PHI needs an executed BAA with the vendor, and there is none. Nothing was sent.',
  },
  EGRESS_BAA_EXPIRED: {
    status: 403,
    issue: 'security',
    ack: 'AE',
    message: "Outbound request refused: the vendor's BAA has expired. Nothing was sent.",
  },
  EGRESS_TOO_MANY_REDIRECTS: {
    status: 502,
    issue: 'transient',
    ack: 'AE',
    message: 'Outbound request stopped: more than 5 redirects.',
  },
  UNAUTHENTICATED: {
    status: 401,
    issue: 'login',
    ack: 'AR',
    message: 'A valid bearer access token is required.',
  },
  FORBIDDEN_SCOPE: {
    status: 403,
    issue: 'forbidden',
    ack: 'AR',
    message: 'The access token does not grant this interaction on this resource type.',
  },
  PURPOSE_REQUIRED: {
    status: 403,
    issue: 'security',
    ack: 'AR',
    message:
      'A purpose of use is required: send X-Purpose-Of-Use with a code from ' +
      'http://terminology.hl7.org/CodeSystem/v3-ActReason, or use a token that carries purpose_of_use.',
  },
  PURPOSE_NOT_ALLOWED: {
    status: 403,
    issue: 'security',
    ack: 'AR',
    message: 'The purpose of use is not allowed for this client.',
  },
  BREAK_GLASS_NOT_ALLOWED: {
    status: 403,
    issue: 'security',
    ack: 'AR',
    message: 'This principal may not break glass (ETREAT with X-Break-Glass-Reason).',
  },
  FORBIDDEN_POLICY: {
    status: 403,
    issue: 'forbidden',
    ack: 'AR',
    message: "The access policy of the user's role does not allow this interaction on this resource.",
  },
  POLICY_INVALID: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message: 'The access policy is not valid.',
  },
  BREAK_GLASS_REVIEWED: {
    status: 409,
    issue: 'conflict',
    ack: 'AE',
    message: 'This break-glass alert has already been reviewed.',
  },
  AUDIT_UNAVAILABLE: {
    status: 503,
    issue: 'transient',
    ack: 'AE',
    message: 'The audit log is unavailable; no data was returned or changed.',
  },
  SEARCH_INVALID: {
    status: 400,
    issue: 'invalid',
    ack: 'AR',
    message: 'A search parameter or its value is malformed; the issues name each one.',
  },
  SEARCH_UNKNOWN_PARAMETER: {
    status: 400,
    issue: 'not-supported',
    ack: 'AR',
    message: 'The search uses parameters this server does not support (Prefer: handling=strict).',
  },
  SEARCH_TOO_COSTLY: {
    status: 400,
    issue: 'too-costly',
    ack: 'AR',
    message: 'The search exceeds a limit on chaining, _has, includes or total work; narrow it.',
  },
  KEY_UNAVAILABLE: {
    status: 503,
    issue: 'transient',
    ack: 'AE',
    message: 'The key provider is unavailable; no protected data was returned or changed.',
  },
  KEY_DESTROYED: {
    status: 410,
    issue: 'deleted',
    ack: 'AE',
    message: 'The keys protecting this data were destroyed (crypto-shredding); it cannot be recovered.',
  },
  SEALED_DATA_INVALID: {
    status: 500,
    issue: 'exception',
    ack: 'AE',
    message: 'Stored protected data failed its integrity check; nothing was returned.',
  },
  AUDIT_EVENT_READ_ONLY: {
    status: 405,
    issue: 'not-supported',
    ack: 'AR',
    message: 'AuditEvent is the audit log: it is read-only, through GET /fhir/R4/AuditEvent.',
  },
  DUAL_CONTROL_REQUIRED: {
    status: 403,
    issue: 'security',
    ack: 'AR',
    message:
      'Destroying keys needs two different administrators of the project: one requests, another approves.',
  },
  SEARCH_PROTECTED: {
    status: 400,
    issue: 'not-supported',
    ack: 'AR',
    message:
      'This search would need the plaintext of protected (encrypted) elements; only exact token matches are possible.',
  },
  USER_EXISTS: {
    status: 409,
    issue: 'duplicate',
    ack: 'AR',
    message: 'A user with this email already exists in this project.',
  },
  PASSWORD_POLICY: {
    status: 400,
    issue: 'value',
    ack: 'AR',
    message: 'The password does not meet the password policy (docs/users.md); the issue names the rule.',
  },
  INVALID_FHIR_USER: {
    status: 400,
    issue: 'value',
    ack: 'AR',
    message:
      'fhirUser must be Patient/<id>, Practitioner/<id> or RelatedPerson/<id> and fit the role (a patient user is bound to a Patient).',
  },
  LOGIN_FAILED: {
    status: 401,
    issue: 'login',
    ack: 'AR',
    message: 'The email, password or one-time code is wrong, or the account cannot log in.',
  },
  AUTH_THROTTLED: {
    status: 429,
    issue: 'throttled',
    ack: 'AR',
    message: 'Too many requests with a missing or invalid access token from this address. Try again later.',
  },
  ACCOUNT_LOCKED: {
    status: 429,
    issue: 'throttled',
    ack: 'AR',
    message: 'Too many failed logins: the account is locked for a while. Try again later.',
  },
  MFA_REQUIRED: {
    status: 401,
    issue: 'login',
    ack: 'AR',
    message: 'A one-time code from the authenticator app (TOTP) is required.',
  },
  MFA_ENROLLMENT_REQUIRED: {
    status: 403,
    issue: 'security',
    ack: 'AR',
    message:
      'Multi-factor authentication is required for this account (administrators, or the project requires it) but not set up.',
  },
  ADMIN_TOKEN_INVALID: { status: 401, issue: 'login', ack: 'AR', message: 'Invalid admin token.' },
  CONFIG_INVALID: { status: 500, issue: 'exception', ack: 'AE', message: 'Invalid configuration.' },
  INTERNAL: {
    status: 500,
    issue: 'exception',
    ack: 'AE',
    message: 'Internal error. Quote the correlation id to your administrator.',
  },
} as const satisfies Record<string, { status: number; issue: string; ack: 'AE' | 'AR'; message: string }>;

export type ErrorCode = keyof typeof ERROR_CATALOG;

/** One problem found in a request, located by a FHIRPath expression. The text is ours, never the caller's. */
export interface IssueDetail {
  severity: 'error' | 'warning' | 'information';
  code: string;
  /** FHIRPath of the element, e.g. `Patient.name[0].given[1]`. */
  expression?: string;
  /** Fixed wording chosen by us (never echoes a value). */
  diagnostics?: string;
}

/** An error whose meaning is its `code`; safe to show and to log. */
export class CustosError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly details: readonly IssueDetail[];
  constructor(code: ErrorCode, details: readonly IssueDetail[] = []) {
    super(ERROR_CATALOG[code].message);
    this.name = 'CustosError';
    this.code = code;
    this.status = ERROR_CATALOG[code].status;
    this.details = details;
  }
}

export function isCustosError(e: unknown): e is CustosError {
  return e instanceof CustosError;
}
