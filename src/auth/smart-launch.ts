import type { SqlQueryable } from '../store/sql-driver.ts';

/**
 * SMART App Launch: the scopes that are not resource scopes, and the launch context a user chose on
 * the consent page (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html).
 */

/** Scopes an app may register and request besides resource scopes. `launch` is the EHR launch. */
export const LAUNCH_SCOPES = [
  'openid',
  'fhirUser',
  'profile',
  'offline_access',
  'online_access',
  'launch',
  'launch/patient',
  'launch/encounter',
] as const;

export function isLaunchScope(scope: string): boolean {
  return (LAUNCH_SCOPES as readonly string[]).includes(scope);
}

/**
 * What the consent page settled for one grant: the patient (and encounter) in context, the purpose
 * of use the user stated, and the user's FHIR identity. Every access token of the grant (also after
 * a refresh) carries it as claims; the token response repeats `patient` and `encounter` as SMART asks.
 */
export interface LaunchContext {
  /** Patient id (not a reference): the SMART `patient` launch parameter. */
  patient?: string;
  encounter?: string;
  /** HL7 v3 PurposeOfUse code the user chose, or the client's only one. */
  purpose?: string;
  /** Relative reference of the user's FHIR resource, e.g. `Practitioner/abc`. */
  fhirUser?: string;
  /** The user's role (users.ts), for the resource server's policy. */
  role: string;
}

/** How long a grant's context is kept: as long as the longest refresh token may live. */
export const LAUNCH_CONTEXT_TTL_SECONDS = 31 * 24 * 3600;
const MODEL = 'CustosLaunchContext';

/** Stores the context of `grantId` (oidc-provider's grant), replacing an earlier one. */
export async function saveLaunchContext(
  db: SqlQueryable,
  grantId: string,
  context: LaunchContext,
): Promise<void> {
  await db.query(
    `INSERT INTO oidc_payload (model, id, payload, grant_id, expires_at)
     VALUES ($1, $2, $3::jsonb, $2, now() + make_interval(secs => $4::double precision))
     ON CONFLICT (model, id) DO UPDATE SET payload = EXCLUDED.payload, expires_at = EXCLUDED.expires_at`,
    [MODEL, grantId, JSON.stringify(context), LAUNCH_CONTEXT_TTL_SECONDS],
  );
}

export async function loadLaunchContext(
  db: SqlQueryable,
  grantId: string,
): Promise<LaunchContext | undefined> {
  const { rows } = await db.query<{ payload: LaunchContext }>(
    `SELECT payload FROM oidc_payload WHERE model = $1 AND id = $2 AND (expires_at IS NULL OR expires_at > now())`,
    [MODEL, grantId],
  );
  return rows[0]?.payload;
}

/**
 * An EHR launch (https://hl7.org/fhir/smart-app-launch/app-launch.html#launch-app-ehr-launch):
 * the EHR (an administrator's tool or integration, through the admin API) creates a launch for one
 * app with the patient and encounter in context, and opens the app's launch URL with `iss` and
 * `launch=<id>`; the app sends `launch` back in its authorization request (with the `launch` scope),
 * and the context comes from here instead of the patient picker. A launch id is 128 random bits,
 * for one app, and expires after {@link EHR_LAUNCH_TTL_SECONDS}.
 */
export interface EhrLaunch {
  projectId: string;
  clientId: string;
  patient?: string;
  encounter?: string;
}

export const EHR_LAUNCH_TTL_SECONDS = 300;
const EHR_MODEL = 'CustosEhrLaunch';

export async function saveEhrLaunch(db: SqlQueryable, id: string, launch: EhrLaunch): Promise<void> {
  await db.query(
    `INSERT INTO oidc_payload (model, id, payload, expires_at)
     VALUES ($1, $2, $3::jsonb, now() + make_interval(secs => $4::double precision))`,
    [EHR_MODEL, id, JSON.stringify(launch), EHR_LAUNCH_TTL_SECONDS],
  );
}

export async function loadEhrLaunch(db: SqlQueryable, id: string): Promise<EhrLaunch | undefined> {
  if (!/^[A-Za-z0-9_-]{16,64}$/.test(id)) return undefined;
  const { rows } = await db.query<{ payload: EhrLaunch }>(
    `SELECT payload FROM oidc_payload WHERE model = $1 AND id = $2 AND (expires_at IS NULL OR expires_at > now())`,
    [EHR_MODEL, id],
  );
  return rows[0]?.payload;
}
