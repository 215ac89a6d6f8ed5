import {
  approveKeyDestruction,
  requestKeyDestruction,
  rewrapKeys,
  rotateKeys,
  type DestroyRequest,
  type RewrapResult,
  type RotateResult,
} from '../phi/key-admin.ts';
import type { ReindexResult } from '../phi/reindex.ts';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command, CommanderError } from 'commander';
import { ConfigError, loadConfig, type Config } from '../config/config.ts';
import { createLogger, silentLogger, type Logger } from '../log/logger.ts';
import { isCustosError } from '../kernel/errors.ts';
import { dataPaths, openCore, runningServer, startServer, VERSION, type CustosCore } from '../server.ts';
import { verifyAuditLog, type AuditVerifyReport } from '../audit/audit-verify.ts';
import type { ConsistencyProof, InclusionProof, SignedCheckpoint } from '../audit/checkpoints.ts';
import { witnessRequest, type WitnessRequest, type WitnessStatus } from '../audit/witness.ts';
import { AuditSetupError, DEFAULT_AUDIT_APP_ROLE, setupAuditDatabase } from '../audit/audit-setup.ts';
import {
  archiveCommand,
  archiveSummary,
  AuditArchiveError,
  verifyArchiveDir,
  type ArchiveCheckReport,
} from '../audit/audit-retention.ts';
import { prepareAuditSchema } from '../audit/audit-migrations.ts';
import type { CreateLaunchResult } from '../admin/ehr-launch.ts';
import type { ClientCredentials, InitResult } from '../admin/admin-service.ts';
import {
  BAA_SERVICES,
  documentSha256,
  type ProjectDetails,
  type ProjectInfo,
  type RecordBaaResult,
} from '../admin/project-baa.ts';
import type { CreatedUser, UserRef } from '../auth/users.ts';
import { vendorCommand } from './vendor-command.ts';
import { policyCommand } from './policy-command.ts';
import { flowsCommand } from './flows-command.ts';
import { subscriptionCommand } from './subscription-command.ts';
import { reportBundle, reportCsv } from '../audit/audit-report.ts';
import { ADMIN_TOKEN_HEADER } from '../admin/admin-routes.ts';
import { EgressGateway, egressFetch } from '../egress/egress.ts';
import { selfVendor } from '../egress/infrastructure.ts';

/**
 * The `custos` command (INTERFACE.md, "Command line"). Exit 0 on success, 1 when the thing checked
 * is not right, 2 on usage or configuration errors. With `--json`, exactly one JSON document on
 * stdout. CLI output never contains resource data.
 */

class ExitError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

function config(): Config {
  try {
    return loadConfig();
  } catch (e) {
    if (e instanceof ConfigError) throw new ExitError(2, `custos: configuration: ${e.message}`);
    throw e;
  }
}

/** Runs `action` through the running server's admin API, or on storage opened directly. */
async function withBackend<T>(
  cfg: Config,
  viaApi: (call: (p: string, body: unknown) => Promise<unknown>) => Promise<T>,
  direct: (core: CustosCore) => Promise<T>,
): Promise<T> {
  const server = runningServer(cfg.dataDir);
  if (server) {
    process.stderr.write(`custos: using the running server's admin API (pid ${server.pid})\n`);
    const token = fs.readFileSync(dataPaths(cfg.dataDir).adminToken, 'utf8').trim();
    // The built-in `self` destination: this installation's own admin API (ADR 0009).
    const egress = EgressGateway.of([selfVendor(server.url)]);
    return viaApi(async (p, body) => {
      const res = await egressFetch(egress, {
        purpose: 'admin-api',
        dataClass: 'full',
        url: `${server.url}${p}`,
        init: {
          method: 'POST',
          headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: token },
          body: JSON.stringify(body),
        },
      });
      // Reports in CSV come back as text/csv.
      if (res.ok && (res.headers.get('content-type') ?? '').startsWith('text/csv')) return res.text();
      const json = (await res.json()) as {
        resourceType?: string;
        issue?: { details?: { text?: string }; diagnostics?: string }[];
      };
      if (!res.ok) {
        const issue = json.issue?.[0];
        throw new ExitError(
          res.status >= 500 ? 1 : 2,
          `custos: ${issue?.details?.text ?? 'request failed'}${issue?.diagnostics ? ` (${issue.diagnostics})` : ''}`,
        );
      }
      return json;
    });
  }
  process.stderr.write('custos: no server running on this data directory; opening storage directly\n');
  const core = await openCore(cfg, silentLogger);
  try {
    return await direct(core);
  } finally {
    await core.close();
  }
}

function print(json: boolean, value: unknown, human: string): void {
  process.stdout.write(json ? `${JSON.stringify(value, null, 2)}\n` : `${human}\n`);
}

function credentialsText(c: ClientCredentials): string {
  return [
    `project:       ${c.projectId}`,
    `client id:     ${c.clientId}`,
    c.clientSecret
      ? `client secret: ${c.clientSecret}   (shown once; store it now)`
      : 'client secret: (not shown: use --new-secret to rotate)',
    `token URL:     ${c.tokenUrl}`,
    `FHIR base URL: ${c.fhirBaseUrl}`,
  ].join('\n');
}

function publicCredentials(r: InitResult | ClientCredentials) {
  const { projectId, clientId, clientSecret, tokenUrl, fhirBaseUrl } = r;
  return clientSecret
    ? { projectId, clientId, clientSecret, tokenUrl, fhirBaseUrl }
    : { projectId, clientId, tokenUrl, fhirBaseUrl };
}

function list(v: string): string[] {
  return v
    .split(/[,\s]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

export function buildCli(): Command {
  const program = new Command('custos')
    .description(
      'Custos: a FHIR R4 server in which every access to PHI is authorized, justified and audited.',
    )
    .version(VERSION)
    // Program options only before a command: `custos policy show --version 2` is the policy's version.
    .enablePositionalOptions()
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  program
    .command('serve')
    .description('Serve FHIR R4, OAuth and the admin API over HTTP')
    .option('--demo', 'create the demo sandbox project on first start and print where its credentials are')
    .action(async (opts: { demo?: boolean }) => {
      const cfg = config();
      const log: Logger = createLogger({ level: cfg.logLevel });
      const server = await startServer(cfg, log);
      const say = (s: string) => process.stderr.write(`${s}\n`);
      if (cfg.env === 'development') {
        say(
          'custos: DEVELOPMENT MODE: embedded storage and the local development keyring are for development only.',
        );
      }
      if (opts.demo) {
        const result = await server.core.admin.init();
        const credFile = path.join(cfg.dataDir, 'demo-credentials.json');
        if (result.clientSecret) {
          fs.writeFileSync(credFile, JSON.stringify(publicCredentials(result), null, 2), { mode: 0o600 });
        }
        say(`custos: demo sandbox project ${result.projectId} (accepts only test data labelled HTEST)`);
        say(`custos: demo client credentials are in ${credFile} (mode 0600; development only)`);
      }
      say(`custos: FHIR base ${cfg.publicUrl}/fhir/R4 (listening on ${server.url}); Ctrl-C to stop`);
      const stop = async () => {
        await server.close();
        process.exit(0);
      };
      process.once('SIGINT', () => void stop());
      process.once('SIGTERM', () => void stop());
    });

  program
    .command('init')
    .description('Idempotent first-run set-up: a sandbox project, an administrator and a system client')
    .option('--json', 'print one JSON document')
    .option('--new-secret', "rotate the system client's secret and print the new one")
    .action(async (opts: { json?: boolean; newSecret?: boolean }) => {
      const cfg = config();
      const r = await withBackend<InitResult>(
        cfg,
        async (call) => (await call('/admin/init', { newSecret: opts.newSecret === true })) as InitResult,
        (core) => core.admin.init({ newSecret: opts.newSecret === true }),
      );
      print(
        opts.json === true,
        publicCredentials(r),
        `${r.created ? 'Created' : 'Already initialised'}:\n${credentialsText(r)}`,
      );
    });

  // Projects and their BAAs (docs/phi-boundary.md).
  const projectCmd = program
    .command('project')
    .description('Projects: sandbox (test data only) or production (with a recorded BAA)');
  const projectText = (p: ProjectInfo) =>
    [
      `project:  ${p.projectId}`,
      `name:     ${p.name}`,
      `kind:     ${p.kind}`,
      ...(p.productionRequested
        ? [
            `production requested: it stays a sandbox (test data only) until its BAA is recorded with\n` +
              `  custos project baa --project ${p.projectId} --counterparty ORG --signed-by NAME --signed-at DATE --services fhir,… --document FILE`,
          ]
        : []),
    ].join('\n');
  projectCmd
    .command('create')
    .description('Create a project (a sandbox; with --production it is promoted when its BAA is recorded)')
    .requiredOption('--name <name>', 'a name for administrators')
    .option('--production', 'for real PHI: needs a BAA, recorded with `custos project baa`')
    .option('--json', 'print one JSON document')
    .action(async (opts: { name: string; production?: boolean; json?: boolean }) => {
      const cfg = config();
      const req = { name: opts.name, production: opts.production === true };
      const r = await withBackend<ProjectInfo>(
        cfg,
        async (call) => (await call('/admin/projects', req)) as ProjectInfo,
        (core) => core.admin.createProject(req),
      );
      print(opts.json === true, r, `Project created:\n${projectText(r)}`);
    });
  projectCmd
    .command('baa')
    .description("Record a project's Business Associate Agreement; the project becomes production (audited)")
    .requiredOption('--project <id>', 'project id')
    .requiredOption('--counterparty <org>', 'the other party to the agreement')
    .requiredOption('--signed-by <name>', 'who signed it')
    .requiredOption('--signed-at <date>', 'when: YYYY-MM-DD or an ISO 8601 date-time with a zone')
    .requiredOption('--services <list>', `covered services, comma-separated: ${BAA_SERVICES.join(', ')}`)
    .requiredOption(
      '--document <file>',
      'the signed document: its SHA-256 is recorded, the file is not stored',
    )
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        project: string;
        counterparty: string;
        signedBy: string;
        signedAt: string;
        services: string;
        document: string;
        json?: boolean;
      }) => {
        let bytes: Buffer;
        try {
          bytes = fs.readFileSync(opts.document);
        } catch {
          throw new ExitError(2, 'custos: --document: cannot read that file; nothing was recorded');
        }
        const cfg = config();
        let recordedBy = 'installation-admin';
        try {
          recordedBy = os.userInfo().username || recordedBy;
        } catch {
          // No account name (some containers): the default stands.
        }
        const req = {
          projectId: opts.project,
          counterparty: opts.counterparty,
          signedBy: opts.signedBy,
          signedAt: opts.signedAt,
          services: list(opts.services),
          documentSha256: documentSha256(bytes),
          recordedBy,
        };
        const r = await withBackend<RecordBaaResult>(
          cfg,
          async (call) => (await call('/admin/projects/baa', req)) as RecordBaaResult,
          (core) => core.admin.recordBaa(req),
        );
        print(
          opts.json === true,
          r,
          `BAA ${r.baaId} recorded for project ${r.projectId} (document SHA-256 ${r.documentSha256}; ` +
            `services ${r.services.join(', ')}).\n` +
            (r.promoted
              ? 'The project is now production: it accepts real PHI.'
              : 'The project was already production.'),
        );
      },
    );
  projectCmd
    .command('show')
    .description("A project's kind and its recorded BAAs")
    .requiredOption('--project <id>', 'project id')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project: string; json?: boolean }) => {
      const cfg = config();
      const r = await withBackend<ProjectDetails>(
        cfg,
        async (call) => (await call('/admin/projects/show', { projectId: opts.project })) as ProjectDetails,
        (core) => core.admin.showProject(opts.project),
      );
      const baas = r.baas.map(
        (b) =>
          `  BAA ${b.baaId}: ${b.counterparty}, signed by ${b.signedBy} at ${b.signedAt}; services ${b.services.join(', ')}; ` +
          `document SHA-256 ${b.documentSha256}; recorded by ${b.recordedBy} at ${b.recordedAt}`,
      );
      print(
        opts.json === true,
        r,
        [projectText(r), ...(baas.length ? baas : ['  no BAA recorded'])].join('\n'),
      );
    });

  // The vendor registry (docs/phi-boundary.md): src/cli/vendor-command.ts.
  vendorCommand(program, {
    config,
    withBackend,
    print,
    list,
    usage: (message) => new ExitError(2, message),
  });
  // Access policies and break-glass alerts (docs/access-policies.md): src/cli/policy-command.ts.
  policyCommand(program, { config, withBackend, print, usage: (message) => new ExitError(2, message) });
  // The PHI flow map (docs/phi-boundary.md): src/cli/flows-command.ts.
  flowsCommand(program, { config, withBackend, print, usage: (message) => new ExitError(2, message) });
  // Rest-hook subscriptions' dead letters (docs/phi-boundary.md): src/cli/subscription-command.ts.
  subscriptionCommand(program, { config, withBackend, print, usage: (message) => new ExitError(2, message) });

  const client = program.command('client').description('OAuth clients');
  client
    .command('create')
    .description(
      'Register a client: a system client (client credentials; SMART Backend Services with --jwks), ' +
        'or a SMART app with --public or --confidential and --redirect-uri',
    )
    .requiredOption('--project <id>', 'project id')
    .requiredOption(
      '--scopes <scopes>',
      'SMART scopes, e.g. "system/*.cruds", or for an app "openid fhirUser launch/patient offline_access patient/*.rs"',
    )
    .requiredOption('--purposes <codes>', 'purposes of use the client may claim, e.g. TREAT,HOPERAT')
    .option('--jwks <file>', 'public JWKS for private_key_jwt (no secret is issued)')
    .option('--public', 'a SMART app that cannot keep a secret (browser, native): PKCE, no secret')
    .option('--confidential', 'a SMART app with a client secret (or --jwks)')
    .option(
      '--redirect-uri <url>',
      'a redirect URI of the SMART app (https, or http on a loopback address); repeat for several',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('--name <name>', 'a label for administrators')
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        project: string;
        scopes: string;
        purposes: string;
        jwks?: string;
        public?: boolean;
        confidential?: boolean;
        redirectUri?: string[];
        name?: string;
        json?: boolean;
      }) => {
        const cfg = config();
        if (opts.public && opts.confidential)
          throw new ExitError(2, 'custos: --public and --confidential exclude each other');
        if ((opts.public || opts.confidential) && !opts.redirectUri?.length)
          throw new ExitError(2, 'custos: a SMART app (--public or --confidential) needs --redirect-uri');
        if (opts.redirectUri?.length && !opts.public && !opts.confidential)
          throw new ExitError(2, 'custos: with --redirect-uri, say --public or --confidential');
        let jwks: { keys: Record<string, unknown>[] } | undefined;
        if (opts.jwks) {
          try {
            jwks = JSON.parse(fs.readFileSync(opts.jwks, 'utf8')) as { keys: Record<string, unknown>[] };
          } catch {
            throw new ExitError(2, 'custos: --jwks: cannot read a JSON Web Key Set from that file');
          }
        }
        const req = {
          projectId: opts.project,
          scopes: list(opts.scopes),
          purposes: list(opts.purposes),
          jwks,
          name: opts.name,
          ...(opts.redirectUri ? { redirectUris: opts.redirectUri } : {}),
          ...(opts.public ? { public: true } : {}),
        };
        const r = await withBackend<ClientCredentials>(
          cfg,
          async (call) => (await call('/admin/clients', req)) as ClientCredentials,
          (core) => core.admin.createClient(req),
        );
        print(opts.json === true, publicCredentials(r), `Client created:\n${credentialsText(r)}`);
      },
    );

  program
    .command('launch')
    .description(
      'Create an EHR launch of a SMART app for a patient (and encounter): prints the launch id and iss ' +
        'to open the app with (valid 5 minutes)',
    )
    .requiredOption('--client <id>', 'the SMART app (registered with the launch scope)')
    .requiredOption('--patient <id>', 'the Patient in context')
    .option('--encounter <id>', 'the Encounter in context')
    .option('--json', 'print one JSON document')
    .action(async (opts: { client: string; patient: string; encounter?: string; json?: boolean }) => {
      const cfg = config();
      const req = {
        clientId: opts.client,
        patient: opts.patient,
        ...(opts.encounter ? { encounter: opts.encounter } : {}),
      };
      const r = await withBackend<CreateLaunchResult>(
        cfg,
        async (call) => (await call('/admin/launches', req)) as CreateLaunchResult,
        (core) => core.admin.createLaunch(req),
      );
      print(
        opts.json === true,
        r,
        `Launch created (valid ${r.expiresIn} s): open the app's launch URL with\n  iss=${r.iss}\n  launch=${r.launch}`,
      );
    });

  program
    .command('reindex')
    .description('Rebuild stale search indexes (after an upgrade or a policy change); resumable')
    .option('--all', 'mark every resource stale first (a changed extraction or protection policy)')
    .option('--batch <n>', 'resources per committed batch', '500')
    .option('--json', 'print one JSON document')
    .action(async (opts: { all?: boolean; batch: string; json?: boolean }) => {
      const cfg = config();
      if (!/^\d{1,5}$/.test(opts.batch) || Number(opts.batch) < 1)
        throw new ExitError(2, 'custos: --batch must be a whole number from 1 to 99999');
      const req = { all: opts.all === true, batch: Number(opts.batch) };
      const r = await withBackend<ReindexResult>(
        cfg,
        async (call) => (await call('/admin/reindex', req)) as ReindexResult,
        (core) => core.reindex(req),
      );
      print(
        opts.json === true,
        r,
        `Reindexed ${r.reindexed} resources (index version ${r.indexVersion}); ${r.remaining} stale left.`,
      );
    });

  // People (docs/users.md). Passwords are read from standard input only, never from argv (ps shows it).
  const userCmd = program
    .command('user')
    .description('People who log in: users, passwords, MFA (docs/users.md)');
  const userRef = (opts: { user?: string; project?: string; email?: string }): UserRef => {
    if (opts.user && !opts.email) return { userId: opts.user };
    if (!opts.user && opts.project && opts.email) return { projectId: opts.project, email: opts.email };
    throw new ExitError(2, 'custos: name the user with --user ID, or with --project P --email E');
  };
  const passwordFromStdin = async (given: boolean | undefined): Promise<string> => {
    if (!given)
      throw new ExitError(2, 'custos: --password-stdin is required: pipe the password on standard input');
    if (process.stdin.isTTY) process.stderr.write('custos: type the password, then Enter and Ctrl-D\n');
    let text = '';
    for await (const chunk of process.stdin) text += String(chunk);
    return text.replace(/\r?\n$/, '');
  };
  const totpText = (r: CreatedUser) =>
    r.totpSecret
      ? `\nTOTP secret: ${r.totpSecret}   (shown once: add it to the authenticator app now)\nTOTP URI:    ${r.totpUri}`
      : '';
  const withUser = (c: Command) =>
    c
      .option('--user <id>', 'the user id')
      .option('--project <id>', 'with --email: the project of the user')
      .option('--email <email>', 'with --project: the email of the user');
  userCmd
    .command('create')
    .description('Create a user; prints { "userId" } and, with --mfa, the TOTP secret once')
    .requiredOption('--project <id>', 'project id')
    .requiredOption('--role <role>', 'practitioner, patient, admin or auditor')
    .requiredOption('--email <email>', 'login name, unique in the project')
    .option(
      '--fhir-user <ref>',
      'Patient/<id> (required for patients), Practitioner/<id> or RelatedPerson/<id>',
    )
    .option('--mfa', 'enrol TOTP (required for admins and in projects that require MFA)')
    .option('--password-stdin', 'read the password from standard input (required)')
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        project: string;
        role: string;
        email: string;
        fhirUser?: string;
        mfa?: boolean;
        passwordStdin?: boolean;
        json?: boolean;
      }) => {
        const password = await passwordFromStdin(opts.passwordStdin);
        const cfg = config();
        const req = {
          projectId: opts.project,
          role: opts.role,
          email: opts.email,
          fhirUser: opts.fhirUser,
          mfa: opts.mfa === true,
          password,
        };
        const r = await withBackend<CreatedUser>(
          cfg,
          async (call) => (await call('/admin/users', req)) as CreatedUser,
          (core) => core.users.create(req),
        );
        print(opts.json === true, r, `User created: ${r.userId}${totpText(r)}`);
      },
    );
  withUser(userCmd.command('reset-password'))
    .description("An administrator's password reset: unlocks the account and ends the user's sessions")
    .option('--password-stdin', 'read the new password from standard input (required)')
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        user?: string;
        project?: string;
        email?: string;
        passwordStdin?: boolean;
        json?: boolean;
      }) => {
        const ref = userRef(opts);
        const password = await passwordFromStdin(opts.passwordStdin);
        const cfg = config();
        const r = await withBackend<{ userId: string; sessionsEnded: number }>(
          cfg,
          async (call) =>
            (await call('/admin/users/reset-password', { ...ref, password })) as {
              userId: string;
              sessionsEnded: number;
            },
          (core) => core.users.resetPassword(ref, password),
        );
        print(
          opts.json === true,
          r,
          `Password of user ${r.userId} reset; ${r.sessionsEnded} session(s) ended.`,
        );
      },
    );
  withUser(userCmd.command('reset-mfa'))
    .description("A new TOTP secret (shown once) replaces the old one; ends the user's sessions")
    .option('--json', 'print one JSON document')
    .action(async (opts: { user?: string; project?: string; email?: string; json?: boolean }) => {
      const ref = userRef(opts);
      const cfg = config();
      const r = await withBackend<CreatedUser & { sessionsEnded: number }>(
        cfg,
        async (call) =>
          (await call('/admin/users/reset-mfa', ref)) as CreatedUser & { sessionsEnded: number },
        (core) => core.users.resetMfa(ref),
      );
      print(
        opts.json === true,
        r,
        `MFA of user ${r.userId} reset; ${r.sessionsEnded} session(s) ended.${totpText(r)}`,
      );
    });
  withUser(userCmd.command('deactivate'))
    .description('Refuse every login of the user from now on and end their sessions at once')
    .option('--json', 'print one JSON document')
    .action(async (opts: { user?: string; project?: string; email?: string; json?: boolean }) => {
      const ref = userRef(opts);
      const cfg = config();
      const r = await withBackend<{ userId: string; sessionsEnded: number }>(
        cfg,
        async (call) =>
          (await call('/admin/users/deactivate', ref)) as { userId: string; sessionsEnded: number },
        (core) => core.users.deactivate(ref),
      );
      print(opts.json === true, r, `User ${r.userId} deactivated; ${r.sessionsEnded} session(s) ended.`);
    });
  userCmd
    .command('mfa-policy')
    .description('Whether every user of a project must use MFA (administrators always must)')
    .requiredOption('--project <id>', 'project id')
    .option('--required', 'require MFA of every user of the project')
    .option('--optional', 'require MFA of administrators and enrolled users only (the default)')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project: string; required?: boolean; optional?: boolean; json?: boolean }) => {
      if (!opts.required === !opts.optional) throw new ExitError(2, 'custos: give --required or --optional');
      const cfg = config();
      const required = opts.required === true;
      type R = { projectId: string; mfaRequired: boolean; usersWithoutMfa: number };
      const r = await withBackend<R>(
        cfg,
        async (call) => (await call('/admin/projects/mfa', { projectId: opts.project, required })) as R,
        (core) => core.users.setProjectMfaRequired(opts.project, required),
      );
      print(
        opts.json === true,
        r,
        `Project ${r.projectId}: MFA ${r.mfaRequired ? 'required of every user' : 'required of administrators and enrolled users'}` +
          (r.mfaRequired && r.usersWithoutMfa > 0
            ? `; ${r.usersWithoutMfa} active user(s) have no MFA and cannot log in until custos user reset-mfa`
            : ''),
      );
    });

  const keysCmd = program.command('keys').description('Encryption keys (docs/keys.md)');
  keysCmd
    .command('rotate-token-signing')
    .description(
      'New access-token signing key (published in /oauth/jwks); the previous one still verifies; ' +
        'takes effect when the server (re)starts',
    )
    .option('--json', 'print one JSON document')
    .action(async (opts: { json?: boolean }) => {
      const cfg = config();
      type Rotated = { kid: string; previousKid?: string; removed: number; restartRequired?: boolean };
      const r = await withBackend<Rotated>(
        cfg,
        async (call) => (await call('/admin/keys/token-signing/rotate', {})) as Rotated,
        async (core) => ({ ...(await core.admin.rotateTokenSigningKey()), restartRequired: false }),
      );
      print(
        opts.json === true,
        r,
        `New signing key ${r.kid}; ${r.previousKid} kept to verify earlier tokens` +
          `${r.removed > 0 ? `; ${r.removed} older key(s) removed` : ''}.` +
          (r.restartRequired ? '\nThe server is running: restart it to sign with the new key.' : ''),
      );
    });
  const keyDeps = (core: CustosCore) => {
    if (!core.keys)
      throw new ExitError(2, 'custos: encryption is off (CUSTOS_ENCRYPTION=off): no keys to manage');
    return core.keys;
  };
  keysCmd
    .command('rotate')
    .description('A new key-encryption key and data-key epoch; new writes use it at once')
    .option('--project <id>', 'only this project (default: every project)')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project?: string; json?: boolean }) => {
      const cfg = config();
      const r = await withBackend<RotateResult>(
        cfg,
        async (call) => (await call('/admin/keys/rotate', { projectId: opts.project })) as RotateResult,
        (core) => rotateKeys(keyDeps(core), { projectId: opts.project }),
      );
      print(
        opts.json === true,
        r,
        r.projects.map((p) => `project ${p.projectId}: key epoch ${p.epoch}`).join('\n') || 'No projects.',
      );
    });
  keysCmd
    .command('rewrap')
    .description("Re-wrap stored data keys under each project's newest key (resumable)")
    .option('--project <id>', 'only this project (default: every project)')
    .option('--reencrypt', 're-seal every stored version under the newest data key too')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project?: string; reencrypt?: boolean; json?: boolean }) => {
      const cfg = config();
      const req = { projectId: opts.project, reencrypt: opts.reencrypt === true };
      const r = await withBackend<RewrapResult>(
        cfg,
        async (call) => (await call('/admin/keys/rewrap', req)) as RewrapResult,
        (core) => rewrapKeys(keyDeps(core), req),
      );
      print(
        opts.json === true,
        r,
        `Re-wrapped ${r.rewrapped} data keys; re-encrypted ${r.reencrypted} versions.`,
      );
    });
  keysCmd
    .command('destroy')
    .description(
      "Crypto-shred a project's keys under dual control: one administrator requests, another approves",
    )
    .requiredOption('--admin <userId>', 'the administrator (app user id) acting')
    .option('--project <id>', "request destruction of this project's keys")
    .option('--approve <requestId>', 'approve a pending request (a different administrator)')
    .option('--json', 'print one JSON document')
    .action(async (opts: { admin: string; project?: string; approve?: string; json?: boolean }) => {
      const cfg = config();
      if (!opts.project === !opts.approve)
        throw new ExitError(2, 'custos: give either --project (request) or --approve REQUEST_ID (approve)');
      const body = { adminUserId: opts.admin, projectId: opts.project, approve: opts.approve };
      const r = await withBackend<DestroyRequest>(
        cfg,
        async (call) => (await call('/admin/keys/destroy', body)) as DestroyRequest,
        (core) =>
          opts.approve
            ? approveKeyDestruction(keyDeps(core), { requestId: opts.approve, adminUserId: opts.admin })
            : requestKeyDestruction(keyDeps(core), { projectId: opts.project!, adminUserId: opts.admin }),
      );
      print(
        opts.json === true,
        r,
        r.state === 'pending'
          ? `Destruction of project ${r.projectId}'s keys requested (${r.requestId}); another administrator must approve it.`
          : `Project ${r.projectId}'s keys are destroyed; its protected elements can no longer be opened.`,
      );
    });

  const audit = program.command('audit').description('The audit log');
  audit
    .command('setup')
    .description(
      'Prepare a PostgreSQL audit database with an administrative role: create or migrate the audit ' +
        'schema and an application role that may only INSERT and SELECT; prints the URL Custos then uses',
    )
    .requiredOption(
      '--admin-url <url>',
      'postgres://ADMIN@host:port/AUDIT_DB of a role that may create roles and owns (or may create) the ' +
        'audit schema; leave the password out of the URL and set PGPASSWORD to keep it out of ps',
    )
    .option('--app-role <name>', 'name of the application role', DEFAULT_AUDIT_APP_ROLE)
    .option(
      '--new-password',
      'set a new password for an existing application role (running servers need the new URL); by default it is kept and the URL carries none',
    )
    .option('--json', 'print one JSON document: { "appDatabaseUrl" }')
    .addHelpText(
      'after',
      '\nIdempotent; one transaction: on any error nothing is changed. Exit 2 when the URL, credentials,\n' +
        'privileges or role must change (or it is not PostgreSQL), 1 when the server cannot be reached.',
    )
    .action(async (opts: { adminUrl: string; appRole: string; newPassword?: boolean; json?: boolean }) => {
      let r;
      try {
        r = await setupAuditDatabase({
          adminUrl: opts.adminUrl,
          appRole: opts.appRole,
          newPassword: opts.newPassword === true,
        });
      } catch (e) {
        if (e instanceof AuditSetupError)
          throw new ExitError(e.exitCode, `custos: audit setup: ${e.message}`);
        throw e;
      }
      const applied = r.migrationsApplied.length
        ? `migrations ${r.migrationsApplied.join(', ')} applied`
        : 'already current';
      const role = r.roleCreated
        ? `role ${r.appRole} created`
        : r.passwordSet
          ? `role ${r.appRole} given a new password`
          : `role ${r.appRole} kept, password unchanged and not shown (--new-password sets one)`;
      print(
        opts.json === true,
        { appDatabaseUrl: r.appDatabaseUrl },
        `audit database ready: schema version ${r.schemaVersion} (${applied}); ${role}, INSERT and SELECT only; ` +
          `set CUSTOS_AUDIT_DATABASE_URL=${r.appDatabaseUrl}`,
      );
    });
  audit
    .command('verify')
    .description(
      'Recompute every leaf hash, the Merkle tree head, the stored tiles and the signed checkpoints; list write attempts without outcome',
    )
    .option('--archive <dir>', 'also check an archive written by `custos audit archive` against this log')
    .option('--json', 'print one JSON document')
    .action(async (opts: { json?: boolean; archive?: string }) => {
      const cfg = config();
      // With --archive: the archive's entries, tiles, notes and proofs, against this log's key and heads.
      type Verified = AuditVerifyReport & { archiveCheck?: ArchiveCheckReport };
      const withArchive = async (
        r: AuditVerifyReport,
        consistency: (from: number, to: number) => Promise<ConsistencyProof>,
      ): Promise<Verified> => {
        if (!opts.archive) return r;
        const archiveCheck = await verifyArchiveDir(opts.archive, {
          consistency,
          archives: r.archive?.archives ?? [],
        });
        return { ...r, ok: r.ok && archiveCheck.ok, archiveCheck };
      };
      const r = await withBackend<Verified>(
        cfg,
        async (call) =>
          withArchive(
            (await call('/admin/audit/verify', {})) as AuditVerifyReport,
            async (from, to) => (await call('/admin/audit/consistency', { from, to })) as ConsistencyProof,
          ),
        async (core) =>
          withArchive(
            await verifyAuditLog(core.audit, core.checkpoints, { witnesses: core.witnesses }),
            (from, to) => core.checkpoints.consistency(from, to),
          ),
      );
      const cps = r.checkpoints;
      const w = r.witnesses;
      const human =
        r.firstBadSeq !== undefined
          ? `audit log BROKEN at sequence number ${r.firstBadSeq} (${r.problem})`
          : cps?.firstBadTreeSize !== undefined
            ? `audit log BROKEN: the signed checkpoint of tree size ${cps.firstBadTreeSize} does not match the log`
            : r.tiles?.firstBad
              ? `audit log BROKEN: stored tile ${r.tiles.firstBad.level}/${r.tiles.firstBad.index} does not match the entries`
              : r.index?.firstBadSeq !== undefined
                ? `audit log BROKEN: the query index rows of sequence number ${r.index.firstBadSeq} do not match the entries`
                : w?.firstBad
                  ? `audit log BROKEN: a cosignature by witness ${w.firstBad.witness} of tree size ${w.firstBad.treeSize} does not verify (${w.firstBad.problem}${w.firstBad.external ? ', in the export directory' : ''})`
                  : r.archive?.firstBad
                    ? `audit log BROKEN: the archive of the entries before ${r.archive.firstBad.archivedBefore} does not check out: ${r.archive.firstBad.problem}`
                    : `audit log OK: ${r.size} entries, tree head ${r.rootHash}, ${cps?.checked ?? 0} signed checkpoint(s), ${r.tiles?.checked ?? 0} stored tile(s) and ${r.index?.checkedRows ?? 0} query index row(s) verified`;
      const archived = r.archive
        ? `\nentries 0 to ${r.archive.archivedBefore - 1} are archived (${r.archive.archives.length} archive(s)): rebuilt from their stored tiles, each archive's watermark, signed note and record checked`
        : '';
      const ac = r.archiveCheck;
      const archiveLine = ac
        ? ac.ok
          ? `\narchive ${ac.dir} OK: entries ${ac.from} to ${(ac.to ?? 0) - 1} match this log's tree, its signed head and its record of the archive`
          : `\narchive ${ac.dir} BROKEN: ${ac.problems.join('; ')}`
        : '';
      const witnessed = w
        ? `\n${w.witnessed} of ${w.checkpoints} signed checkpoint(s) witnessed` +
          (w.byWitness.length
            ? ` (${w.byWitness.map((b) => `${b.name}: ${b.checkpoints}`).join(', ')})`
            : '') +
          (w.unchecked ? `; ${w.unchecked} cosignature(s) by witnesses no longer configured not checked` : '')
        : '';
      const pending = r.attemptsWithoutOutcome.length
        ? `\n${r.attemptsWithoutOutcome.length} write attempt(s) without outcome: ${r.attemptsWithoutOutcome.join(', ')}`
        : '';
      print(opts.json === true, r, human + archived + archiveLine + witnessed + pending);
      if (!r.ok) process.exitCode = 1;
    });
  audit
    .command('archive')
    .description(
      'Move the oldest audit entries, older than the retention period, out of the audit database into an ' +
        'archive directory with the proofs that keep the tree verifiable (docs/audit.md, Retention)',
    )
    .requiredOption(
      '--before <date>',
      'archive entries older than this date (YYYY-MM-DD, UTC) or instant; at most now minus CUSTOS_AUDIT_RETENTION_YEARS',
    )
    .requiredOption('--out <dir>', 'the archive directory to create (new, or empty)')
    .option(
      '--admin-url <url>',
      'with a PostgreSQL audit database (required there): postgres://ADMIN@host:port/AUDIT_DB of the role that ran ' +
        '`custos audit setup`; leave the password out of the URL and set PGPASSWORD',
    )
    .option(
      '--allow-unforwarded',
      'archive entries a SIEM destination has not confirmed yet (they are in the archive either way)',
    )
    .option('--json', 'print one JSON document')
    .addHelpText(
      'after',
      '\nOnly a prefix of the log, in whole tiles of 256 entries, each older than --before by its time and by\n' +
        'the database clock. The archive is verified before anything is deleted; then one transaction appends\n' +
        'the archive record, the watermark, and deletes the entries and their index rows. Exit 2 for usage or\n' +
        'a --before inside the retention period, 1 when the log or the archive does not verify.',
    )
    .action(
      async (opts: {
        before: string;
        out: string;
        adminUrl?: string;
        allowUnforwarded?: boolean;
        json?: boolean;
      }) => {
        const cfg = config();
        const paths = dataPaths(cfg.dataDir);
        let r;
        try {
          r = await archiveCommand({
            auditDatabaseUrl: cfg.auditDatabaseUrl,
            adminUrl: opts.adminUrl,
            embeddedDir: paths.audit,
            serverRunning: runningServer(cfg.dataDir) !== undefined,
            keyFile: paths.auditCheckpointKey,
            // The origin the server signs checkpoints under (server.ts).
            origin: `${new URL(cfg.publicUrl).host}/custos/audit`,
            checkpointDir: cfg.auditCheckpointDir,
            retentionYears: cfg.auditRetentionYears,
            before: opts.before,
            out: opts.out,
            allowUnforwarded: opts.allowUnforwarded === true,
            prepareEmbedded: (db) => prepareAuditSchema(db, { production: false }),
          });
        } catch (e) {
          if (e instanceof AuditArchiveError)
            throw new ExitError(e.exitCode, `custos: audit archive: ${e.message}`);
          throw e;
        }
        print(opts.json === true, r, archiveSummary(r));
      },
    );
  audit
    .command('witness-request')
    .description(
      'Print the C2SP tlog-witness add-checkpoint request body for the newest signed checkpoint, with a ' +
        'consistency proof from tree size OLD, to POST to <witness prefix>/add-checkpoint',
    )
    .requiredOption('--old <size>', 'the tree size the witness last cosigned (0: none; no proof lines)')
    .option('--json', 'print one JSON document: { old, treeSize, proof, checkpoint, body }')
    .action(async (opts: { old: string; json?: boolean }) => {
      if (!/^\d{1,15}$/.test(opts.old))
        throw new ExitError(2, 'custos: --old must be a non-negative integer');
      const old = Number(opts.old);
      const cfg = config();
      const r = await withBackend<WitnessRequest>(
        cfg,
        async (call) => (await call('/admin/audit/witness-request', { old })) as WitnessRequest,
        (core) => witnessRequest(core.checkpoints, old),
      );
      // The body byte for byte (it ends with the checkpoint note's newline): no newline added.
      if (opts.json) print(true, r, '');
      else await new Promise<void>((resolve) => process.stdout.write(r.body, () => resolve()));
    });
  audit
    .command('witnesses')
    .description('Where each configured witness (CUSTOS_AUDIT_WITNESSES) stands: cosigned size and lag')
    .option('--json', 'print one JSON document')
    .action(async (opts: { json?: boolean }) => {
      const cfg = config();
      const r = await withBackend<WitnessStatus[]>(
        cfg,
        async (call) => (await call('/admin/audit/witnesses', {})) as WitnessStatus[],
        (core) => core.witnesses.status(),
      );
      const human = r.length
        ? r
            .map(
              (s) =>
                `${s.name} (${s.url}): cosigned tree size ${s.cosignedSize} of ${s.latestCheckpointSize}, lag ${s.lag}` +
                (s.problem ? `; last attempt failed: ${s.problem}` : ''),
            )
            .join('\n')
        : 'No witnesses configured (CUSTOS_AUDIT_WITNESSES).';
      print(opts.json === true, r, human);
      if (r.some((s) => s.problem !== undefined && s.problem !== 'unreachable' && s.problem !== 'http_error'))
        process.exitCode = 1;
    });
  audit
    .command('checkpoint')
    .description('Sign the current Merkle tree head (a C2SP tlog-checkpoint note, Ed25519) and store it')
    .option('--json', 'print one JSON document')
    .action(async (opts: { json?: boolean }) => {
      const cfg = config();
      const cp = await withBackend<SignedCheckpoint>(
        cfg,
        async (call) => (await call('/admin/audit/checkpoint', {})) as SignedCheckpoint,
        (core) => core.checkpoints.checkpoint(),
      );
      print(opts.json === true, cp, `${cp.note}\nverifier key: ${cp.verifierKey}`);
    });

  audit
    .command('prove')
    .description(
      'Print an RFC 9162 proof: inclusion of one entry in a signed checkpoint (--seq), or consistency ' +
        'between two tree sizes (--from, --to)',
    )
    .option('--seq <n>', 'sequence number of the entry (inclusion proof)')
    .option('--from <size>', 'older tree size (consistency proof), at least 1')
    .option(
      '--to <size>',
      'newer tree size (consistency proof; default: the current log, signing a checkpoint)',
    )
    .option('--json', 'print one JSON document')
    .action(async (opts: { seq?: string; from?: string; to?: string; json?: boolean }) => {
      const cfg = config();
      const whole = (flag: string, v: string) => {
        if (!/^\d{1,15}$/.test(v)) throw new ExitError(2, `custos: ${flag} must be a non-negative integer`);
        return Number(v);
      };
      if ((opts.seq === undefined) === (opts.from === undefined))
        throw new ExitError(2, 'custos: audit prove needs either --seq N or --from OLD [--to NEW]');
      if (opts.from !== undefined) {
        if (opts.seq !== undefined) throw new ExitError(2, 'custos: --seq cannot be combined with --from');
        const from = whole('--from', opts.from);
        const to = opts.to === undefined ? undefined : whole('--to', opts.to);
        const c = await withBackend<ConsistencyProof>(
          cfg,
          async (call) => (await call('/admin/audit/consistency', { from, to })) as ConsistencyProof,
          (core) => core.checkpoints.consistency(from, to),
        );
        const head = (h: ConsistencyProof['from']) =>
          h.checkpoint ? h.checkpoint.trimEnd() : `(no signed checkpoint of tree size ${h.treeSize})`;
        const human = [
          `the tree of size ${c.from.treeSize} (root ${c.from.rootHash}) is a prefix of the tree of size ${c.to.treeSize} (root ${c.to.rootHash})`,
          'proof:',
          ...c.proof.map((h) => `  ${h}`),
          `tree size ${c.from.treeSize}:`,
          head(c.from),
          `tree size ${c.to.treeSize}:`,
          head(c.to),
          `verifier key: ${c.verifierKey}`,
        ].join('\n');
        print(opts.json === true, c, human);
        return;
      }
      if (opts.to !== undefined) throw new ExitError(2, 'custos: --to needs --from');
      const seq = whole('--seq', opts.seq!);
      const proof = await withBackend<InclusionProof | undefined>(
        cfg,
        async (call) => (await call('/admin/audit/prove', { seq })) as InclusionProof,
        (core) => core.checkpoints.prove(seq),
      );
      if (!proof) throw new ExitError(1, `custos: no audit entry with sequence number ${seq}`);
      const human = [
        `entry ${proof.seq} (leaf hash ${proof.leafHash}) is in the tree of size ${proof.treeSize}, root ${proof.rootHash}`,
        'proof (leaf to root):',
        ...proof.proof.map((h) => `  ${h}`),
        'signed checkpoint:',
        proof.checkpoint.trimEnd(),
        `verifier key: ${proof.verifierKey}`,
      ].join('\n');
      print(opts.json === true, proof, human);
    });

  // Reports (docs/audit.md): CSV by default, --json for the FHIR Bundle. Each run is audited.
  const reportCommand = (name: 'report' | 'disclosures', description: string) =>
    audit
      .command(name)
      .description(description)
      .requiredOption('--patient <id>', 'the Patient id')
      .option(
        '--since <date>',
        name === 'report' ? 'FHIR date or dateTime (default: six years ago)' : 'at most six years ago',
      )
      .option('--until <date>', 'FHIR date or dateTime (default: now)')
      .option('--project <id>', "only this project's events (default: every project)")
      .option('--purpose <code>', 'why the report is run: PATRQT (default), HCOMPL, HLEGAL or HSYSADMIN')
      .option('--csv', 'print CSV with a header row (the default)')
      .option('--json', 'print the FHIR Bundle of AuditEvents')
      .action(
        async (opts: {
          patient: string;
          since?: string;
          until?: string;
          project?: string;
          purpose?: string;
          csv?: boolean;
          json?: boolean;
        }) => {
          if (opts.csv && opts.json) throw new ExitError(2, 'custos: give --csv or --json, not both');
          const cfg = config();
          const kind = name === 'report' ? 'access' : 'disclosures';
          const format = opts.json ? 'fhir' : 'csv';
          const req = {
            patient: opts.patient,
            since: opts.since,
            until: opts.until,
            projectId: opts.project,
            purpose: opts.purpose,
          };
          const out = await withBackend<string>(
            cfg,
            async (call) => {
              const { projectId: project, ...rest } = req;
              const r = await call(`/admin/audit/${name}`, { ...rest, project, format });
              return typeof r === 'string' ? r : JSON.stringify(r, null, 2);
            },
            async (core) => {
              const r = await core.reports.run(kind, req);
              return format === 'csv'
                ? reportCsv(r)
                : JSON.stringify(reportBundle(r, core.auditQuery.fhirBaseUrl), null, 2);
            },
          );
          // A report can be large: wait until it is written (the command exits right after).
          await new Promise<void>((resolve) =>
            process.stdout.write(out.endsWith('\n') ? out : `${out}\n`, () => resolve()),
          );
        },
      );
  reportCommand('report', "Who accessed a patient's record: every audit event naming the patient");
  reportCommand(
    'disclosures',
    'Accounting of disclosures (45 CFR 164.528): successful releases for purposes other than treatment, payment and operations, last six years',
  );
  return program;
}

export async function runCli(argv: string[]): Promise<number> {
  const program = buildCli();
  try {
    await program.parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    if (e instanceof ConfigError) {
      // Found when storage was opened (e.g. an audit schema older than this code).
      process.stderr.write(`custos: configuration: ${e.message}\n`);
      return 2;
    }
    if (e instanceof ExitError) {
      process.stderr.write(`${e.message}\n`);
      return e.exitCode;
    }
    if (isCustosError(e)) {
      const detail = e.details[0]?.diagnostics;
      process.stderr.write(`custos: ${e.message}${detail ? ` ${detail}` : ''}\n`);
      return e.status >= 500 ? 1 : 2;
    }
    // Unknown errors may quote data: print only their class.
    process.stderr.write(`custos: unexpected ${e instanceof Error ? e.name : 'error'}; see the server log\n`);
    return 1;
  }
}

const isMain = process.argv[1] && /(?:custos(?:\.mjs)?|main\.ts)$/.test(process.argv[1]);
if (isMain) {
  const args = process.argv.slice(2);
  void runCli(args).then((code) => {
    // `serve` keeps running; every other command exits with its code.
    if (args[0] !== 'serve' || code !== 0) process.exit(code);
  });
}
