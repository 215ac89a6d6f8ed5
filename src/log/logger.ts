import pino, { type DestinationStream } from 'pino';

/**
 * The scrubbing logger: the only way Custos logs (rule 4 of DESIGN.md).
 *
 * It logs by allowlist. An event name is a constant chosen by the code; fields are a closed set of
 * typed keys, and every string value must look like what its key promises (an id, a code, a route
 * pattern). Anything else is replaced by `"[redacted]"`. There is deliberately no way to log a free
 * message, a URL, a header, a resource, or an error's message: those can carry PHI.
 */
export interface LogFields {
  requestId?: string;
  projectId?: string;
  clientId?: string;
  userId?: string;
  resourceType?: string;
  resourceId?: string;
  versionId?: string;
  method?: string;
  /** A route pattern such as `/fhir/R4/:type/:id`, never the request URL. */
  route?: string;
  status?: number;
  code?: string;
  purpose?: string;
  durationMs?: number;
  count?: number;
  seq?: number;
  port?: number;
  host?: string;
  storage?: string;
  /** For unknown errors: the class name and stack frames (file:line), never the message. */
  errorName?: string;
  errorFrames?: string[];
  migration?: number;
}

const PATTERNS: Record<string, RegExp> = {
  requestId: /^[A-Za-z0-9-]{1,64}$/,
  projectId: /^[A-Za-z0-9\-.]{1,64}$/,
  clientId: /^[A-Za-z0-9\-._]{1,128}$/,
  userId: /^[A-Za-z0-9\-.]{1,64}$/,
  resourceType: /^[A-Z][A-Za-z]{1,63}$/,
  resourceId: /^[A-Za-z0-9\-.]{1,64}$/,
  versionId: /^[0-9]{1,12}$/,
  method: /^[A-Z]{3,7}$/,
  route: /^[A-Za-z0-9/_:.\-*$]{0,200}$/,
  code: /^[A-Za-z0-9_.-]{1,64}$/,
  purpose: /^[A-Z]{2,12}$/,
  host: /^[A-Za-z0-9.:\-[\]]{1,255}$/,
  storage: /^(embedded|postgres)$/,
  errorName: /^[A-Za-z]{1,64}$/,
};

const NUMERIC = new Set(['status', 'durationMs', 'count', 'seq', 'port', 'migration']);
const EVENT = /^[a-z][a-z0-9_.]{0,63}$/;
const REDACTED = '[redacted]';
const FRAME = /^\s*at (?:[\w$.<> [\]]{1,120} )?\(?(?:file:\/\/)?[\w/.\-@]+:\d+:\d+\)?$/;

/** Returns only the allowed, well-formed parts of `fields`. Exported for the leak tests. */
export function scrubFields(fields: LogFields): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(fields)) {
    if (v === undefined) continue;
    if (NUMERIC.has(k)) {
      out[k] = typeof v === 'number' && Number.isFinite(v) ? v : REDACTED;
    } else if (k === 'errorFrames') {
      out[k] = Array.isArray(v)
        ? v.slice(0, 12).map((f) => (typeof f === 'string' && FRAME.test(f) ? f.trim() : REDACTED))
        : REDACTED;
    } else {
      const re = PATTERNS[k];
      if (!re) continue; // unknown key: dropped, never logged
      out[k] = typeof v === 'string' && re.test(v) ? v : REDACTED;
    }
  }
  return out;
}

/** Stack frames of an error without its first line (which holds the message). */
export function errorFields(e: unknown): Pick<LogFields, 'errorName' | 'errorFrames'> {
  if (!(e instanceof Error)) return { errorName: 'NonError' };
  const frames = (e.stack ?? '').split('\n').filter((l) => /^\s*at /.test(l));
  return { errorName: e.name, errorFrames: frames };
}

export interface Logger {
  debug(event: string, fields?: LogFields): void;
  info(event: string, fields?: LogFields): void;
  warn(event: string, fields?: LogFields): void;
  error(event: string, fields?: LogFields): void;
}

export function createLogger(opts: { level?: string; destination?: DestinationStream } = {}): Logger {
  const p = pino(
    {
      level: opts.level ?? 'info',
      base: null,
      messageKey: 'event',
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    opts.destination ?? pino.destination({ fd: 1, sync: false }),
  );
  const emit =
    (level: 'debug' | 'info' | 'warn' | 'error') =>
    (event: string, fields: LogFields = {}) => {
      p[level](scrubFields(fields), EVENT.test(event) ? event : 'invalid.event');
    };
  return { debug: emit('debug'), info: emit('info'), warn: emit('warn'), error: emit('error') };
}

/** A logger that writes nothing (tests that do not inspect logs). */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
