import type { Command } from 'commander';
import { allowlistText, flowMapDot, flowMapMermaid, flowMapText, type FlowMap } from '../egress/flow-map.ts';
import { type CommandDeps } from './command-deps.ts';

export type FlowsCommandDeps = CommandDeps;

/**
 * `custos flows [--json|--mermaid|--dot] [--allowlist]`: the PHI flow map of the running
 * configuration (src/egress/flow-map.ts). Exit 0 when every flow is covered, 1 when one is not (the
 * map, or the allowlist, is printed in full either way), 2 on usage errors.
 */
export function flowsCommand(program: Command, d: FlowsCommandDeps): void {
  program
    .command('flows')
    .description(
      'The PHI flow map of the running configuration: where PHI enters, rests and leaves, each flow covered by a BAA or not',
    )
    .option('--json', 'print one JSON document')
    .option('--mermaid', 'print a Mermaid flowchart (uncovered flows in red)')
    .option('--dot', 'print a Graphviz digraph (uncovered flows in red)')
    .option(
      '--allowlist',
      'print the egress allowlist (host, port, protocol, vendor, data class) for a proxy or firewall; with --json as JSON',
    )
    .addHelpText(
      'after',
      '\nExit 0 when every flow is covered, 1 when one is not (the output is complete either way), 2 on usage errors.\n' +
        "With the server running, the map is the server's own (through its admin API).",
    )
    .action(async (opts: { json?: boolean; mermaid?: boolean; dot?: boolean; allowlist?: boolean }) => {
      const formats = [opts.json && '--json', opts.mermaid && '--mermaid', opts.dot && '--dot'].filter(
        Boolean,
      );
      if (formats.length > 1) throw d.usage(`custos: give one of ${formats.join(', ')}, not several`);
      if (opts.allowlist && (opts.mermaid || opts.dot))
        throw d.usage('custos: --allowlist prints text or, with --json, JSON; not a drawing');
      const cfg = d.config();
      const map = await d.withBackend<FlowMap>(
        cfg,
        async (call) => (await call('/admin/flows', {})) as FlowMap,
        (core) => core.flows(),
      );
      if (opts.allowlist)
        d.print(
          opts.json === true,
          { generatedAt: map.generatedAt, covered: map.covered, allowlist: map.allowlist },
          allowlistText(map),
        );
      else if (opts.mermaid) process.stdout.write(flowMapMermaid(map));
      else if (opts.dot) process.stdout.write(flowMapDot(map));
      else d.print(opts.json === true, map, flowMapText(map));
      if (!map.covered) {
        if (opts.json || opts.allowlist || opts.mermaid || opts.dot)
          process.stderr.write(
            `custos: ${map.flows.filter((f) => !f.covered).length} flow(s) not covered (custos flows for the reasons)\n`,
          );
        process.exitCode = 1;
      }
    });
}
