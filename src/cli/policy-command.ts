import fs from 'node:fs';
import type { Command } from 'commander';
import type { CustosCore } from '../server.ts';
import { isResourceType } from '../fhir/resource-types.ts';
import { protectedCriteria } from '../phi/minimum-necessary.ts';
import {
  listBreakGlass,
  listPolicies,
  reviewBreakGlass,
  setPolicy,
  showPolicy,
  USER_ROLES,
  type BreakGlassAlert,
  type RolePolicy,
  type StoredPolicy,
} from '../phi/access-policy.ts';
import { type CommandDeps, whoami } from './command-deps.ts';

export type PolicyCommandDeps = CommandDeps;

type ShownPolicy = StoredPolicy & { current: number; history: Omit<StoredPolicy, 'policy'>[] };

function origin(p: Pick<StoredPolicy, 'version' | 'changedBy' | 'changedAt'>): string {
  return p.version === 0
    ? 'built-in default'
    : `version ${p.version}, set by ${p.changedBy ?? '?'} at ${p.changedAt ?? '?'}`;
}

/** Human text of one role policy: its rules, one a line. */
export function policyText(p: StoredPolicy): string {
  const rule = (r: RolePolicy['rules'][number]) =>
    `  ${r.effect.padEnd(5)} ${r.interactions.padEnd(5)} ${r.types.join(',')}` +
    `${r.criteria ? ` ?${r.criteria}` : ''}${r.compartment ? ` [${r.compartment}]` : ''}`;
  const pol = p.policy;
  return [
    `${p.role} (${origin(p)})`,
    ...(pol.rules.length ? pol.rules.map(rule) : ['  no rule: nothing allowed']),
    `  purposes: ${pol.purposes.join(', ') || 'none'}`,
    `  visible classes: ${pol.visibleClasses ? pol.visibleClasses.join(', ') || 'none' : 'all the purpose reveals'}`,
    `  break-glass: ${pol.breakGlass ? `yes (${pol.breakGlassMinutes ?? 'default'} minutes)` : 'no'}`,
  ].join('\n');
}

/** Human text of one break-glass alert. */
export function alertText(a: BreakGlassAlert): string {
  const review = a.reviewedAt
    ? `reviewed ${a.reviewedAt} by ${a.reviewedBy}: ${a.outcome}`
    : 'PENDING REVIEW';
  return (
    `${a.id}  ${review}\n  user ${a.userId} (${a.role}) via client ${a.clientId}, project ${a.projectId}, ` +
    `${a.purpose} from ${a.startedAt} until ${a.expiresAt}; reason sealed in the audit events of request ${a.requestId}`
  );
}

function readPolicyFile(d: PolicyCommandDeps, file: string): unknown {
  let text: string;
  try {
    text = file === '-' ? fs.readFileSync(0, 'utf8') : fs.readFileSync(file, 'utf8');
  } catch {
    throw d.usage('custos: --file: cannot read that file; nothing was changed');
  }
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw d.usage('custos: --file: the file is not JSON; nothing was changed');
  }
}

function roleOf(d: PolicyCommandDeps, role: string): string {
  if (!(USER_ROLES as readonly string[]).includes(role))
    throw d.usage(`custos: --role must be one of ${USER_ROLES.join(', ')}`);
  return role;
}

/**
 * `custos policy list|show|set` and `custos break-glass list|review` (docs/access-policies.md):
 * through the running server's admin API, or on storage opened directly.
 */
export function policyCommand(program: Command, d: PolicyCommandDeps): void {
  const policy = program
    .command('policy')
    .description(
      'Access policies: what each role of a project may do, for which purposes (versioned, audited)',
    );
  policy
    .command('list')
    .description('The policy in force for each role of a project (a stored version, or the built-in default)')
    .requiredOption('--project <id>', 'project id')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project: string; json?: boolean }) => {
      const cfg = d.config();
      const r = await d.withBackend<{ policies: StoredPolicy[] }>(
        cfg,
        async (call) =>
          (await call('/admin/policies/list', { projectId: opts.project })) as { policies: StoredPolicy[] },
        async (core) => ({ policies: await listPolicies(policyDeps(core), opts.project) }),
      );
      d.print(opts.json === true, r, r.policies.map(policyText).join('\n'));
    });
  policy
    .command('show')
    .description(
      "One role's policy (the current one, or --version N; 0 is the built-in default) and its versions",
    )
    .requiredOption('--project <id>', 'project id')
    .requiredOption('--role <role>', USER_ROLES.join(', '))
    .option('--version <n>', 'a stored version')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project: string; role: string; version?: string; json?: boolean }) => {
      const role = roleOf(d, opts.role);
      if (opts.version !== undefined && !/^\d{1,9}$/.test(opts.version))
        throw d.usage('custos: --version must be a whole number');
      const version = opts.version === undefined ? undefined : Number(opts.version);
      const cfg = d.config();
      const r = await d.withBackend<ShownPolicy>(
        cfg,
        async (call) =>
          (await call('/admin/policies/show', { projectId: opts.project, role, version })) as ShownPolicy,
        (core) => showPolicy(policyDeps(core), opts.project, role, version),
      );
      const versions = r.history.map(
        (h) =>
          `  ${h.version === r.current ? '*' : ' '} version ${h.version}: set by ${h.changedBy} at ${h.changedAt}`,
      );
      d.print(
        opts.json === true,
        r,
        [
          policyText(r),
          r.version === r.current
            ? '(in force)'
            : `(not in force: version ${r.current || 'built-in default'} is)`,
          'versions:',
          ...(versions.length ? versions : ['    none stored: the built-in default is in force']),
        ].join('\n'),
      );
    });
  policy
    .command('set')
    .description(
      "Store a new version of a role's policy from a JSON file (validated; audited; in force within seconds)",
    )
    .requiredOption('--project <id>', 'project id')
    .requiredOption('--role <role>', USER_ROLES.join(', '))
    .requiredOption('--file <policy.json>', 'the policy document (docs/access-policies.md); - for stdin')
    .option('--json', 'print one JSON document')
    .action(async (opts: { project: string; role: string; file: string; json?: boolean }) => {
      const role = roleOf(d, opts.role);
      const doc = readPolicyFile(d, opts.file);
      const cfg = d.config();
      const req = { projectId: opts.project, role, policy: doc, changedBy: whoami() };
      const r = await d.withBackend<StoredPolicy>(
        cfg,
        async (call) => (await call('/admin/policies/set', req)) as StoredPolicy,
        (core) => setPolicy(policyDeps(core), req),
      );
      d.print(opts.json === true, r, `Policy stored:\n${policyText(r)}`);
    });

  const glass = program
    .command('break-glass')
    .description('Break-glass (emergency access) alerts, each reviewed by an administrator');
  glass
    .command('list')
    .description('Break-glass alerts, unreviewed first, newest first')
    .option('--pending', 'only the alerts not yet reviewed')
    .option('--project <id>', 'only this project')
    .option('--json', 'print one JSON document')
    .action(async (opts: { pending?: boolean; project?: string; json?: boolean }) => {
      const cfg = d.config();
      const req = { projectId: opts.project, pending: opts.pending === true };
      const r = await d.withBackend<{ alerts: BreakGlassAlert[] }>(
        cfg,
        async (call) => (await call('/admin/break-glass/list', req)) as { alerts: BreakGlassAlert[] },
        async (core) => ({ alerts: await listBreakGlass({ db: core.resourceDb }, req) }),
      );
      d.print(
        opts.json === true,
        r,
        r.alerts.length
          ? r.alerts.map(alertText).join('\n')
          : opts.pending
            ? 'No break-glass alert awaits review.'
            : 'No break-glass alert.',
      );
    });
  glass
    .command('review')
    .description('Record the finding on a break-glass alert, once (audited)')
    .requiredOption('--id <id>', 'the alert')
    .requiredOption('--outcome <outcome>', 'justified or not-justified')
    .option('--json', 'print one JSON document')
    .action(async (opts: { id: string; outcome: string; json?: boolean }) => {
      if (opts.outcome !== 'justified' && opts.outcome !== 'not-justified')
        throw d.usage('custos: --outcome must be justified or not-justified');
      const cfg = d.config();
      const req = { id: opts.id, outcome: opts.outcome, reviewedBy: whoami() };
      const r = await d.withBackend<BreakGlassAlert>(
        cfg,
        async (call) => (await call('/admin/break-glass/review', req)) as BreakGlassAlert,
        (core) => reviewBreakGlass({ db: core.resourceDb, audit: core.audit }, req),
      );
      d.print(opts.json === true, r, `Reviewed:\n${alertText(r)}`);
    });
}

function policyDeps(core: CustosCore) {
  return { db: core.resourceDb, audit: core.audit, isResourceType, ...protectedCriteria(core) };
}
