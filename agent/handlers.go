package agent

import "slices"

// configTypes are the replication types with a config table of their own,
// mimeo.refresh_config_<type>; only these names reach SQL that way.
var configTypes = []string{"snap", "table", "inserter", "updater", "dml", "logdel", "logical"}

// typeConfigTable is the config table of a replication type.
func typeConfigTable(typ string) string {
	if !slices.Contains(configTypes, typ) {
		panic("agent: not a replication type: " + typ)
	}
	return "mimeo.refresh_config_" + typ
}

// registerHandlers maps request actions to the code that runs them; the
// SQL functions name these actions when they enqueue.
func (a *Agent) registerHandlers() map[string]handler {
	return map[string]handler{
		"snapshot_maker":     {job: "Snapshot Maker", run: a.makeSnap},
		"refresh_snap":       {job: "Refresh Snap", run: a.refreshSnap},
		"snapshot_destroyer": {job: "Snapshot Destroyer", run: a.destroySnap},
		"table_maker":        {job: "Table Maker", run: a.makeTable},
		"refresh_table":      {job: "Refresh Table", run: a.refreshTable},
		"table_destroyer":    {job: "Table Destroyer", run: a.destroyTable},
		"inserter_maker":     {job: "Inserter Maker", run: a.makeInserter},
		"refresh_inserter":   {job: "Refresh Inserter", run: a.refreshInserter},
		"inserter_destroyer": {job: "Inserter Destroyer", run: a.destroyTable},
		"updater_maker":      {job: "Updater Maker", run: a.makeUpdater},
		"refresh_updater":    {job: "Refresh Updater", run: a.refreshUpdater},
		"updater_destroyer":  {job: "Updater Destroyer", run: a.destroyTable},
		"dml_maker":          {job: "DML Maker", run: a.makeDML},
		"refresh_dml":        {job: "Refresh DML", run: a.refreshDML},
		"dml_destroyer":      {job: "DML Destroyer", run: a.destroyDML},
		"logdel_maker":       {job: "Logdel Maker", run: a.makeLogdel},
		"refresh_logdel":     {job: "Refresh Logdel", run: a.refreshLogdel},
		"logdel_destroyer":   {job: "Logdel Destroyer", run: a.destroyLogdel},
		"logical_maker":      {job: "Logical Maker", run: a.makeLogical},
		"refresh_logical":    {job: "Refresh Logical", run: a.refreshLogical},
		"logical_destroyer":  {job: "Logical Destroyer", run: a.destroyLogical},

		"validate":                    {job: "Validate", run: a.validateTable},
		"validate_rowcount":           {job: "Validate Rowcount", run: a.validateRowcount},
		"check_source_columns":        {job: "Check Source Columns", run: a.checkSourceColumns, global: true},
		"check_missing_source_tables": {job: "Check Missing Source Tables", run: a.checkMissingSourceTables, global: true},
		"snapshot_monitor":            {job: "Snapshot Monitor", run: a.snapshotMonitor, global: true},
	}
}
