import type { SubscriptionWorkerOptions } from '../../src/subscriptions/subscription-worker.ts';
import { loadConfig, type Config } from '../../src/config/config.ts';
import { createLogger, type Logger } from '../../src/log/logger.ts';
import { startServer, type RunningServer } from '../../src/server.ts';
import type { PlannerStatisticsOptions } from '../../src/store/planner-statistics.ts';
import type { InitResult } from '../../src/admin/admin-service.ts';
import { createTestStorage, type TestStorage } from './storage.ts';
import { Writable } from 'node:stream';
import { freePort } from './free-port.ts';

export { freePort };

/** HTEST label required by sandbox projects. */
export const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };

/** An obviously synthetic patient (SSN 9xx, phone 555-01xx). */
export function testPatient(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    resourceType: 'Patient',
    meta: { security: [HTEST] },
    identifier: [{ system: 'http://hl7.org/fhir/sid/us-ssn', value: '999-01-0001' }],
    name: [{ family: 'Testpatient', given: ['Zzyzx'] }],
    telecom: [{ system: 'phone', value: '555-0100' }],
    gender: 'other',
    birthDate: '1970-01-01',
    ...extra,
  };
}

export interface Harness {
  server: RunningServer;
  storage: TestStorage;
  config: Config;
  init: InitResult;
  base: string;
  /** Everything the server logged, one JSON line per entry. */
  logLines: string[];
  token(scope?: string): Promise<string>;
  /** fetch against the FHIR base with a bearer token and purpose TREAT by default. */
  fhir(
    path: string,
    init?: RequestInit & { purpose?: string | null; token?: string | null },
  ): Promise<Response>;
  close(): Promise<void>;
}

export async function startHarness(
  opts: {
    storage?: TestStorage;
    env?: Record<string, string>;
    subscriptions?: Partial<SubscriptionWorkerOptions>;
    plannerStatistics?: PlannerStatisticsOptions;
  } = {},
): Promise<Harness> {
  const storage = opts.storage ?? (await createTestStorage());
  // The issuer (public URL) must name the port actually bound, so pick a free one first.
  const port = await freePort();
  const config = loadConfig({ ...storage.env, CUSTOS_PORT: String(port), ...opts.env });
  const logLines: string[] = [];
  const destination = new Writable({
    write(chunk, _enc, cb) {
      logLines.push(...String(chunk).split('\n').filter(Boolean));
      cb();
    },
  });
  const log: Logger = createLogger({ level: 'debug', destination: destination as never });
  const server = await startServer(config, log, {
    subscriptions: opts.subscriptions,
    plannerStatistics: opts.plannerStatistics,
  });
  const init = await server.core.admin.init();
  const base = `${server.url}/fhir/R4`;
  // Tokens live five minutes; a cached one is renewed after one (a machine stalled for minutes
  // must not turn every later request into a 401).
  const tokens = new Map<string, { token: string; at: number }>();
  const token = async (scope = 'system/*.cruds') => {
    const cached = tokens.get(scope);
    if (cached && Date.now() - cached.at < 60_000) return cached.token;
    const res = await fetch(`${server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope,
        client_id: init.clientId,
        client_secret: init.clientSecret!,
      }),
    });
    const json = (await res.json()) as { access_token?: string };
    if (!json.access_token) throw new Error(`token request failed: ${res.status}`);
    tokens.set(scope, { token: json.access_token, at: Date.now() });
    return json.access_token;
  };
  const fhir: Harness['fhir'] = async (path, init = {}) => {
    const headers = new Headers(init.headers);
    if (init.token !== null) headers.set('authorization', `Bearer ${init.token ?? (await token())}`);
    if (init.purpose !== null) headers.set('x-purpose-of-use', init.purpose ?? 'TREAT');
    if (init.body !== undefined && !headers.has('content-type'))
      headers.set('content-type', 'application/fhir+json');
    return fetch(`${base}${path}`, { ...init, headers });
  };
  return {
    server,
    storage,
    config,
    init,
    base,
    logLines,
    token,
    fhir,
    async close() {
      await server.close();
      if (!opts.storage) await storage.cleanup();
    },
  };
}
