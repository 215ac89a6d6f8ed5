import { randomBytes } from 'node:crypto';
import { CustosError } from '../kernel/errors.ts';
import { isFhirId, newId } from '../kernel/ids.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import type { ClientRegistry } from '../auth/client-registry.ts';
import { EHR_LAUNCH_TTL_SECONDS, saveEhrLaunch } from '../auth/smart-launch.ts';

export interface CreateLaunchResult {
  /** The opaque launch id the EHR passes to the app as `launch`. */
  launch: string;
  /** The FHIR base URL the EHR passes to the app as `iss`. */
  iss: string;
  clientId: string;
  expiresIn: number;
}

function bad(diagnostics: string, expression: string): CustosError {
  return new CustosError('BAD_REQUEST', [{ severity: 'error', code: 'value', diagnostics, expression }]);
}

/**
 * Creates an EHR launch (docs/users.md, "EHR launch"): one app, the patient and optionally the
 * encounter in context, valid {@link EHR_LAUNCH_TTL_SECONDS} seconds. The app must be an active
 * SMART app registered with the `launch` scope; the patient and encounter must exist in its project
 * (existence only: their content is read later through the gateway, under the user's policy).
 * Audited as `launch.created`, with the patient as the event's resource.
 */
export async function createEhrLaunch(
  deps: { db: SqlDriver; clients: ClientRegistry; audit: AuditLog; publicUrl: string },
  input: { clientId?: unknown; patient?: unknown; encounter?: unknown },
  requestId = newId(),
): Promise<CreateLaunchResult> {
  if (typeof input.clientId !== 'string' || input.clientId === '')
    throw bad('A client id is required.', 'clientId');
  const client = await deps.clients.find(input.clientId);
  if (!client || !client.active) throw bad('No such active client.', 'clientId');
  if (client.redirectUris.length === 0 || !client.scopes.includes('launch'))
    throw bad('The client is not a SMART app registered with the launch scope.', 'clientId');
  const exists = async (type: string, id: unknown, field: string): Promise<string> => {
    if (typeof id !== 'string' || !isFhirId(id)) throw bad(`${field} must be a resource id.`, field);
    const { rows } = await deps.db.query(
      `SELECT 1 FROM resource WHERE project_id = $1 AND resource_type = $2 AND id = $3 AND NOT deleted`,
      [client.projectId, type, id],
    );
    if (rows.length === 0) throw bad(`No such ${type} in the app's project.`, field);
    return id;
  };
  if (input.patient === undefined) throw bad('A patient is required.', 'patient');
  const patient = await exists('Patient', input.patient, 'patient');
  const encounter =
    input.encounter === undefined ? undefined : await exists('Encounter', input.encounter, 'encounter');
  const launch = randomBytes(16).toString('base64url');
  await saveEhrLaunch(deps.db, launch, {
    projectId: client.projectId,
    clientId: client.id,
    patient,
    ...(encounter ? { encounter } : {}),
  });
  await deps.audit.append(
    adminEvent('launch.created', {
      requestId,
      projectId: client.projectId,
      resource: { type: 'Patient', id: patient },
    }),
  );
  return { launch, iss: `${deps.publicUrl}/fhir/R4`, clientId: client.id, expiresIn: EHR_LAUNCH_TTL_SECONDS };
}
