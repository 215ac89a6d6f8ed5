import { loadConfig } from '../../src/config/config.ts';
import { createLogger } from '../../src/log/logger.ts';
import { openCore, type CustosCore } from '../../src/server.ts';
import { PhiGateway, type Interaction, type Principal } from '../../src/phi/gateway.ts';
import { validateResource } from '../../src/fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../../src/fhir/resource-types.ts';
import { allowsAnyContext, parseSmartScopes } from '../../src/auth/smart-scopes.ts';
import { isCustosError } from '../../src/kernel/errors.ts';
import { newId } from '../../src/kernel/ids.ts';
import type { AuditEvent } from '../../src/audit/audit-event.ts';
import type { SensitiveFields } from '../../src/audit/audit-sealer.ts';
import { createTestStorage, type TestStorage } from './storage.ts';
import { HTEST } from './harness.ts';

/**
 * A core on fresh test storage and PHI gateways built over it directly, with principals made by
 * hand (the OAuth authorization-code flow that makes them from tokens is built separately). Every
 * audit event the gateways append is also kept in `events` (with what was sealed).
 */
export interface AccessFixture {
  core: CustosCore;
  storage: TestStorage;
  projectA: string;
  projectB: string;
  events: { e: AuditEvent; sensitive?: SensitiveFields }[];
  clock: { now: Date };
  gateway(opts?: { breakGlassMinutes?: number }): PhiGateway;
  close(): Promise<void>;
}

export const BASE = 'http://custos.test/fhir/R4';

export async function openAccessFixture(): Promise<AccessFixture> {
  const storage = await createTestStorage();
  const config = loadConfig({ ...storage.env });
  const core = await openCore(config, createLogger({ level: 'silent' }));
  const init = await core.admin.init();
  const b = await core.admin.createProject({ name: 'Project B' });
  const events: AccessFixture['events'] = [];
  const clock = { now: new Date('2030-01-01T00:00:00Z') };
  const audit = {
    append: async (e: AuditEvent, sensitive?: SensitiveFields) => {
      events.push({ e, sensitive });
      return core.audit.append(e, sensitive);
    },
  } as unknown as CustosCore['audit'];
  return {
    core,
    storage,
    projectA: init.projectId,
    projectB: b.projectId,
    events,
    clock,
    gateway: (opts = {}) =>
      new PhiGateway({
        db: core.resourceDb,
        audit,
        log: createLogger({ level: 'silent' }),
        validate: validateResource,
        isResourceType,
        resourceTypes: RESOURCE_TYPES,
        fhirBaseUrl: BASE,
        encryption: core.encryption,
        breakGlassMinutes: opts.breakGlassMinutes,
        now: () => clock.now,
      }),
    async close() {
      await core.close();
      await storage.cleanup();
    },
  };
}

/** A system client (client credentials): no person, scopes and purposes of its registration. */
export function systemPrincipal(
  projectId: string,
  scopes = 'system/*.cruds',
  purposes = ['TREAT', 'HOPERAT', 'HCOMPL'],
  mayBreakGlass = false,
): Principal {
  const parsed = parseSmartScopes(scopes);
  return {
    projectId,
    clientId: `system-${projectId}`,
    roles: ['system'],
    allowedPurposes: purposes,
    mayBreakGlass,
    can: (type: string, i: Interaction) =>
      parsed.some(
        (s) => s.query === undefined && (s.resourceType === '*' || s.resourceType === type) && s[i],
      ),
  };
}

/** A person behind a SMART app: role, FHIR identity, launch patient and granted scopes. */
export function userPrincipal(
  projectId: string,
  u: {
    role: 'practitioner' | 'patient' | 'admin' | 'auditor';
    fhirUser?: string;
    launchPatient?: string;
    scopes: string;
    purposes?: string[];
  },
): Principal {
  const scopes = parseSmartScopes(u.scopes);
  return {
    projectId,
    clientId: 'smart-app',
    userId: `user-${u.role}-${u.fhirUser ?? 'none'}`,
    userRole: u.role,
    fhirUser: u.fhirUser,
    launchPatient: u.launchPatient,
    scopes,
    roles: [u.role],
    allowedPurposes: u.purposes ?? ['TREAT', 'CAREMGT', 'PATRQT', 'HOPERAT', 'HCOMPL', 'HPAYMT'],
    mayBreakGlass: false,
    can: (type, i) => allowsAnyContext(scopes, type, i),
  };
}

/** The HTTP status an interaction ends with (a thrown catalog error is its status). */
export async function statusOf(run: () => Promise<{ status: number }>): Promise<number> {
  try {
    return (await run()).status;
  } catch (e) {
    if (isCustosError(e)) return e.status;
    throw e;
  }
}

export const labelled = <T extends Record<string, unknown>>(r: T): T => ({
  ...r,
  meta: { security: [HTEST] },
});

export function facts(purpose?: string, reason?: string) {
  return { requestId: newId(), purposeHeader: purpose, breakGlassReason: reason };
}
