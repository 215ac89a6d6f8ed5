import type { IssueDetail } from './errors.ts';

/** An OperationOutcome issue about one input field (`expression`), code `value` unless given. */
export const fieldIssue = (expression: string, diagnostics: string, code = 'value'): IssueDetail => ({
  severity: 'error',
  code,
  expression,
  diagnostics,
});

/** A short human label (a name, a counterparty): trimmed, 1–200 characters, no control characters. */
export function shortLabel(v: unknown): string | undefined {
  if (typeof v !== 'string') return undefined;
  const s = v.trim();
  // eslint-disable-next-line no-control-regex
  if (s.length === 0 || s.length > 200 || /[\u0000-\u001f\u007f]/.test(s)) return undefined;
  return s;
}
