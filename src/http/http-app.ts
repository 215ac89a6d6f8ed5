import http from 'node:http';
import https from 'node:https';
import fs from 'node:fs';
import { isIP } from 'node:net';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { RateLimiter } from '../kernel/rate-limit.ts';
import { CustosError, isCustosError, type ErrorCode } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { errorFields, type Logger } from '../log/logger.ts';
import {
  operationOutcomeJson,
  parseIfMatch,
  type InteractionResult,
  type PhiGateway,
  type Principal,
} from '../phi/gateway.ts';
import type { Config } from '../config/config.ts';
import { readAuditEvent, searchAuditEvents, type AuditQueryDeps } from '../audit/audit-query.ts';
import { parseJsonBody } from './json-body.ts';

/** What the HTTP layer needs from authentication: a principal from a bearer token, or an error. */
export type Authenticate = (bearer: string) => Promise<Principal>;

export interface HttpAppDeps {
  config: Config;
  log: Logger;
  gateway: PhiGateway;
  authenticate: Authenticate;
  /** Bad-token requests allowed per client address (default 100 at once, 100 a minute). */
  authFailureLimit?: { capacity: number; perMinute: number };
  /** oidc-provider's request handler, mounted for /oauth/* and OpenID discovery. */
  oauthHandler: (req: http.IncomingMessage, res: http.ServerResponse) => void;
  capabilityStatement: () => unknown;
  smartConfiguration: () => unknown;
  /** Admin API routes (registered by src/admin). */
  registerAdmin: (app: FastifyInstance) => void;
  /** The audit log as AuditEvent resources; reads are authorized by the gateway (auditReader). */
  auditQuery: AuditQueryDeps;
}

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
/** Largest request body: a large transaction bundle fits; 50 MB is refused with 413. */
export const BODY_LIMIT = 32 * 1024 * 1024;

declare module 'fastify' {
  interface FastifyRequest {
    principal?: Principal;
    startedAt: number;
  }
}

function isOauthPath(url: string): boolean {
  return url.startsWith('/oauth/') || url.startsWith('/.well-known/openid-configuration');
}

/**
 * The Fastify application: a thin adapter from HTTP to the PHI gateway. Fastify's own request
 * logging is off: its serializer logs URLs with their query strings (PHI). We log route patterns.
 */
export function createHttpApp(deps: HttpAppDeps): FastifyInstance {
  const { config, log, gateway } = deps;
  const base = `${config.publicUrl}/fhir/R4`;
  const serverFactory = (handler: http.RequestListener) => {
    const listener: http.RequestListener = (req, res) => {
      if (isOauthPath(req.url ?? '')) deps.oauthHandler(req, res);
      else handler(req, res);
    };
    const server = config.tls
      ? https.createServer(
          {
            cert: fs.readFileSync(config.tls.certFile),
            key: fs.readFileSync(config.tls.keyFile),
            minVersion: 'TLSv1.2',
          },
          listener,
        )
      : http.createServer(listener);
    // With a serverFactory Fastify does not apply its keep-alive default; Node's 5 s makes clients
    // that reuse a connection as it closes see ECONNRESET (docs/bench.md).
    server.keepAliveTimeout = 72_000;
    server.headersTimeout = 73_000;
    return server;
  };
  const app = Fastify({
    logger: false,
    bodyLimit: BODY_LIMIT,
    trustProxy: config.trustedProxies.length > 0 ? [...config.trustedProxies] : false,
    genReqId: () => newId(),
    serverFactory,
    // FHIR ids may be 64 characters; resource URLs stay short.
    routerOptions: { maxParamLength: 200, ignoreTrailingSlash: true },
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    // Errors Fastify raises before routing (a malformed %-escape, an over-long path segment) get our
    // OperationOutcome too: Fastify's default body quotes the request path.
    frameworkErrors: (err, req, reply) => {
      void reply.header('X-Request-Id', req.id);
      sendError(err, req, reply);
      log.info('http.request', {
        requestId: req.id,
        method: req.method,
        route: 'unmatched',
        status: reply.statusCode,
      });
    },
  });

  app.decorateRequest('principal', undefined);
  app.decorateRequest('startedAt', 0);
  app.addHook('onRequest', async (req, reply) => {
    req.startedAt = performance.now();
    void reply.header('X-Request-Id', req.id);
  });
  app.addHook('onResponse', async (req, reply) => {
    log.info('http.request', {
      requestId: req.id,
      method: req.method,
      route: req.routeOptions.url ?? 'unmatched',
      status: reply.statusCode,
      durationMs: Math.round((performance.now() - req.startedAt) * 100) / 100,
      clientId: req.principal?.clientId,
    });
  });

  // Bodies: FHIR JSON (and plain JSON), JSON Patch. Anything else gets 415 from Fastify.
  app.removeAllContentTypeParsers();
  for (const type of ['application/fhir+json', 'application/json', 'application/json-patch+json']) {
    app.addContentTypeParser(type, { parseAs: 'string', bodyLimit: BODY_LIMIT }, (_req, body, done) => {
      try {
        done(null, parseJsonBody(body as string));
      } catch (e) {
        done(e as Error, undefined);
      }
    });
  }

  // POST [type]/_search carries its parameters form-encoded.
  app.addContentTypeParser(
    'application/x-www-form-urlencoded',
    { parseAs: 'string', bodyLimit: BODY_LIMIT },
    (req, body, done) => {
      // Only the _search endpoints take form bodies; anywhere else it is the wrong media type.
      if (!/\/_search(?:\?|$)/.test(req.url)) done(new CustosError('UNSUPPORTED_MEDIA_TYPE'), undefined);
      else done(null, new URLSearchParams(body as string));
    },
  );

  function sendError(err: unknown, req: FastifyRequest, reply: FastifyReply): void {
    const code = errorCodeOf(err);
    if (code === 'INTERNAL') log.error('http.internal_error', { requestId: req.id, ...errorFields(err) });
    if (code === 'BODY_TOO_LARGE') lingeringClose(req, reply);
    if (code === 'AUTH_THROTTLED') void reply.header('Retry-After', '60');
    void reply
      .status(new CustosError(code).status)
      .type(FHIR_JSON)
      .send(
        operationOutcomeJson(
          code,
          isCustosError(err) ? err.details : [],
          code === 'INTERNAL' ? req.id : undefined,
        ),
      );
  }
  app.setErrorHandler((err, req, reply) => sendError(err, req, reply));
  app.setNotFoundHandler((_req, reply) => {
    void reply.status(404).type(FHIR_JSON).send(operationOutcomeJson('ROUTE_NOT_FOUND'));
  });

  // ---- unauthenticated discovery ----
  app.get('/fhir/R4/metadata', async (_req, reply) =>
    reply.type(FHIR_JSON).send(JSON.stringify(deps.capabilityStatement())),
  );
  app.get('/fhir/R4/.well-known/smart-configuration', async (_req, reply) =>
    reply
      .type('application/json')
      .header('Cache-Control', 'public, max-age=300')
      .send(deps.smartConfiguration()),
  );
  app.get('/healthz', async () => ({ status: 'ok' }));

  deps.registerAdmin(app);

  // ---- authenticated FHIR interactions ----
  // Requests with a missing or bad token, per client address (req.ip: the socket, or the client
  // behind a trusted proxy): 100 at once, refilled at 100 a minute; then 429 for that address.
  const authFailures = new RateLimiter(deps.authFailureLimit ?? { capacity: 100, perMinute: 100 });
  const authed = async (
    req: FastifyRequest,
    action: Parameters<PhiGateway['recordUnauthenticated']>[1],
  ): Promise<Principal> => {
    const h = req.headers.authorization;
    const m = typeof h === 'string' ? /^Bearer ([A-Za-z0-9\-._~+/]+=*)$/.exec(h) : null;
    try {
      // An address that sent too many bad tokens is slowed down before its next token is even
      // checked (token guessing, a leaked-token scan); good tokens never count against it.
      if (authFailures.wait(req.ip) > 0) throw new CustosError('AUTH_THROTTLED');
      if (!m) throw new CustosError('UNAUTHENTICATED');
      req.principal = await deps.authenticate(m[1]!);
      return req.principal;
    } catch (e) {
      const type = (req.params as { type?: string } | undefined)?.type;
      try {
        await gateway.recordUnauthenticated(facts(req), action, type);
      } catch {
        throw new CustosError('AUDIT_UNAVAILABLE');
      }
      if (isCustosError(e) && e.code === 'AUTH_THROTTLED') throw e;
      authFailures.take(req.ip);
      throw isCustosError(e) && e.code === 'UNAUTHENTICATED' ? e : new CustosError('UNAUTHENTICATED');
    }
  };
  const session = async (req: FastifyRequest, action: Parameters<PhiGateway['recordUnauthenticated']>[1]) =>
    gateway.session(await authed(req, action), facts(req));

  type P = { type: string; id: string; vid: string };

  app.get<{ Params: P }>('/fhir/R4/:type/:id', async (req, reply) => {
    if (req.params.id === '_history') {
      const q = req.query as Record<string, string | undefined>;
      return sendResult(
        reply,
        await (await session(req, 'history')).history(base, { type: req.params.type, ...historyOpts(q) }),
      );
    }
    return sendResult(reply, await (await session(req, 'read')).read(req.params.type, req.params.id));
  });
  app.get<{ Params: P }>('/fhir/R4/:type/:id/_history', async (req, reply) => {
    const q = req.query as Record<string, string | undefined>;
    return sendResult(
      reply,
      await (
        await session(req, 'history')
      ).history(base, { type: req.params.type, id: req.params.id, ...historyOpts(q) }),
    );
  });
  app.get<{ Params: P }>('/fhir/R4/:type/:id/_history/:vid', async (req, reply) =>
    sendResult(
      reply,
      await (await session(req, 'vread')).vread(req.params.type, req.params.id, req.params.vid),
    ),
  );
  app.get('/fhir/R4/_history', async (req, reply) => {
    const q = req.query as Record<string, string | undefined>;
    return sendResult(reply, await (await session(req, 'history')).history(base, historyOpts(q)));
  });
  // ---- search: GET or POST _search (form-encoded), type, system and Patient compartment ----
  const searchQuery = (req: FastifyRequest): URLSearchParams => {
    const qi = req.url.indexOf('?');
    const q = new URLSearchParams(qi < 0 ? '' : req.url.slice(qi + 1));
    // POST _search: the form body's parameters join those of the URL.
    if (req.body instanceof URLSearchParams) for (const [k, v] of req.body) q.append(k, v);
    return q;
  };
  const strict = (req: FastifyRequest) =>
    /(?:^|[;,\s])handling\s*=\s*strict\b/.test(header(req, 'prefer') ?? '');
  const search = async (
    req: FastifyRequest,
    reply: FastifyReply,
    opts: { type?: string; patient?: string; path: string },
  ) => {
    const s = await session(req, 'search');
    return sendResult(reply, await s.search(base, { ...opts, query: searchQuery(req), strict: strict(req) }));
  };
  // ---- the audit log (src/audit/audit-query.ts): AuditEvent is served from it, read-only ----
  const auditSearch = async (req: FastifyRequest, reply: FastifyReply) => {
    const query = searchQuery(req);
    const access = await (await session(req, 'audit-read')).auditReader('s', query.toString());
    return reply.type(FHIR_JSON).send(await searchAuditEvents(deps.auditQuery, access, query));
  };
  app.get('/fhir/R4/AuditEvent', auditSearch);
  app.post('/fhir/R4/AuditEvent/_search', auditSearch);
  app.get<{ Params: { id: string } }>('/fhir/R4/AuditEvent/:id', async (req, reply) => {
    const access = await (await session(req, 'audit-read')).auditReader('r');
    return reply.type(FHIR_JSON).send(await readAuditEvent(deps.auditQuery, access, req.params.id));
  });
  app.get<{ Params: P }>('/fhir/R4/:type', async (req, reply) =>
    search(req, reply, { type: req.params.type, path: `/${req.params.type}` }),
  );
  app.post<{ Params: P }>('/fhir/R4/:type/_search', async (req, reply) =>
    search(req, reply, { type: req.params.type, path: `/${req.params.type}` }),
  );
  app.get('/fhir/R4', async (req, reply) => search(req, reply, { path: '' }));
  app.post('/fhir/R4/_search', async (req, reply) => search(req, reply, { path: '' }));
  app.get<{ Params: { type: string; id: string; ctype: string } }>(
    '/fhir/R4/:type/:id/:ctype',
    async (req, reply) => {
      // Compartment search: only the Patient compartment is supported.
      if (req.params.type !== 'Patient') throw new CustosError('ROUTE_NOT_FOUND');
      return search(req, reply, {
        type: req.params.ctype,
        patient: req.params.id,
        path: `/Patient/${req.params.id}/${req.params.ctype}`,
      });
    },
  );
  app.post<{ Params: P }>('/fhir/R4/:type', async (req, reply) => {
    const s = await session(req, 'create');
    const ifNoneExist = header(req, 'if-none-exist');
    return sendResult(reply, await s.create(req.params.type, req.body, { ifNoneExist }), preferOf(req));
  });
  app.put<{ Params: P }>('/fhir/R4/:type/:id', async (req, reply) => {
    const s = await session(req, 'update');
    const ifMatch = parseIfMatch(header(req, 'if-match'));
    return sendResult(
      reply,
      await s.update(req.params.type, req.params.id, req.body, { ifMatch }),
      preferOf(req),
    );
  });
  app.put<{ Params: P }>('/fhir/R4/:type', async (req, reply) => {
    const s = await session(req, 'update');
    const qi = req.url.indexOf('?');
    if (qi < 0) throw new CustosError('UNSUPPORTED_CONDITION');
    return sendResult(
      reply,
      await s.conditionalUpdate(req.params.type, req.url.slice(qi + 1), req.body),
      preferOf(req),
    );
  });
  app.patch<{ Params: P }>('/fhir/R4/:type/:id', async (req, reply) => {
    const s = await session(req, 'patch');
    const ifMatch = parseIfMatch(header(req, 'if-match'));
    return sendResult(
      reply,
      await s.patch(req.params.type, req.params.id, req.body, { ifMatch }),
      preferOf(req),
    );
  });
  app.delete<{ Params: P }>('/fhir/R4/:type/:id', async (req, reply) =>
    sendResult(reply, await (await session(req, 'delete')).delete(req.params.type, req.params.id)),
  );
  // Batch and transaction: POST to the base, with or without the trailing slash.
  app.post('/fhir/R4', async (req, reply) => {
    const kind = (req.body as { type?: unknown } | null)?.type;
    const action = kind === 'batch' ? 'batch' : 'transaction';
    const s = await session(req, action);
    if ((req.body as { resourceType?: unknown } | null)?.resourceType !== 'Bundle')
      throw new CustosError('INVALID_BUNDLE');
    if (kind === 'batch') return sendResult(reply, await s.batch(base, req.body));
    if (kind === 'transaction') return sendResult(reply, await s.transaction(base, req.body));
    throw new CustosError('INVALID_BUNDLE');
  });

  function sendResult(reply: FastifyReply, r: InteractionResult, prefer: string | undefined = undefined) {
    void reply.status(r.status).type(FHIR_JSON);
    if (r.body !== undefined) return reply.send(r.body);
    const v = r.version;
    if (!v) return reply.send();
    void reply
      .header('ETag', `W/"${v.versionId}"`)
      .header('Last-Modified', new Date(v.lastUpdated).toUTCString());
    if (r.status === 201)
      void reply.header('Location', `${base}/${v.resourceType}/${v.id}/_history/${v.versionId}`);
    if (r.status === 204 || r.status === 410) {
      return r.status === 410 ? reply.send(operationOutcomeJson('GONE')) : reply.send();
    }
    if (prefer === 'minimal') return reply.send();
    if (prefer === 'OperationOutcome') {
      return reply.send(
        JSON.stringify({
          resourceType: 'OperationOutcome',
          issue: [
            {
              severity: 'information',
              code: 'informational',
              diagnostics: r.existing ? 'Existing resource matched the condition.' : 'Done.',
            },
          ],
        }),
      );
    }
    return reply.send(v.json);
  }
  return app;
}

/** How long the rest of a refused, too large body is read and discarded before the connection is cut. */
const LINGER_MS = 5000;

/**
 * Fastify answers a too large body at once and closes the connection while the client is still
 * sending; the kernel then resets it (unread data), and the client often never reads the 413 (fetch
 * fails with EPIPE or ECONNRESET). Instead the connection stays open and Node reads and discards the
 * rest of the body once the response is sent; if the client is still sending after LINGER_MS, the
 * connection is cut.
 */
function lingeringClose(req: FastifyRequest, reply: FastifyReply): void {
  if (req.raw.complete) return;
  reply.removeHeader('connection');
  const socket = req.raw.socket;
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  const done = () => clearTimeout(timer);
  req.raw.once('end', done);
  socket.once('close', done);
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name];
  return typeof v === 'string' ? v : undefined;
}

function preferOf(req: FastifyRequest): string | undefined {
  const m = /return=(minimal|representation|OperationOutcome)/.exec(header(req, 'prefer') ?? '');
  return m?.[1];
}

/**
 * The caller's address, for the audit: an IP address and nothing else. Behind trusted proxies
 * `req.ip` comes from X-Forwarded-For, which the client writes: a value that is not an address (and
 * any IPv6 zone, which may be any text) is not recorded; the nearest valid hop is recorded instead.
 */
function sourceIp(req: FastifyRequest): string | undefined {
  for (const candidate of [req.ip, ...[...(req.ips ?? [])].reverse(), req.socket.remoteAddress]) {
    const ip = candidate?.split('%')[0];
    if (ip && isIP(ip)) return ip;
  }
  return undefined;
}

function facts(req: FastifyRequest) {
  return {
    requestId: req.id,
    sourceIp: sourceIp(req),
    purposeHeader: header(req, 'x-purpose-of-use'),
    breakGlassReason: header(req, 'x-break-glass-reason'),
    userAgent: header(req, 'user-agent'),
  };
}

/**
 * FHIR dateTime (https://hl7.org/fhir/R4/datatypes.html#dateTime): a year, month or day, or a time
 * with seconds and a zone. `Date.parse` alone is not a check: it accepts `2020-01-01 (anything)`,
 * which the database then refuses (a 500 instead of a 400).
 */
const FHIR_DATE_TIME =
  /^\d{4}(?:-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01])(?:T(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d{1,9})?(?:Z|[+-](?:0\d|1[0-3]):[0-5]\d|[+-]14:00))?)?)?$/;

function historyOpts(q: Record<string, string | undefined>) {
  const count = q._count !== undefined ? Number(q._count) : undefined;
  if (count !== undefined && !(Number.isInteger(count) && count > 0)) throw new CustosError('BAD_REQUEST');
  let since: string | undefined;
  if (q._since !== undefined) {
    // An unencoded `+` in the zone arrives as a space.
    const text = q._since.replace(/ (\d\d:\d\d)$/, '+$1');
    const t = FHIR_DATE_TIME.test(text) ? Date.parse(text) : NaN;
    if (Number.isNaN(t)) throw new CustosError('BAD_REQUEST');
    since = new Date(t).toISOString();
  }
  return { since, count, cursor: q._cursor };
}

/** Maps an error (ours or Fastify's) to a catalog code; anything unknown is INTERNAL. */
function errorCodeOf(err: unknown): ErrorCode {
  if (isCustosError(err)) return err.code;
  const code = (err as { code?: unknown }).code;
  switch (code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return 'BODY_TOO_LARGE';
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return 'UNSUPPORTED_MEDIA_TYPE';
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_TYPE':
      return 'INVALID_JSON';
    case 'FST_ERR_BAD_URL':
    case 'FST_ERR_MAX_PARAM_LENGTH':
      return 'BAD_REQUEST';
    default: {
      const status = (err as { statusCode?: unknown }).statusCode;
      return typeof status === 'number' && status >= 400 && status < 500 ? 'BAD_REQUEST' : 'INTERNAL';
    }
  }
}
